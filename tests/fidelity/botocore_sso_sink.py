"""botocore's SSOTokenProvider reads a token sink in the AWS SSO cache format.

Driven by tests/sinks.rs: HOME (and AWS_CONFIG_FILE) point at a temp dir
whose ~/.aws/config has a profile with an sso-session; the running proxy
writes the sink into ~/.aws/sso/cache/<sha1 of the session name>.json.

Each round builds a new provider (botocore re-reads the cache file then) and
asks for a frozen token. The check passes when WANT distinct tokens were
read, each unexpired, before DEADLINE seconds. It prints one line per new
token, with the SHA-256 of its value (never the token), and a summary line.

usage: botocore_sso_sink.py PROFILE WANT DEADLINE
"""

import datetime
import hashlib
import json
import os
import sys
import time

import botocore.session
from botocore.tokens import SSOTokenProvider


def main():
    profile, want, deadline = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    session = botocore.session.Session(profile=profile)
    sso = session.full_config["profiles"][profile]["sso_session"]
    start_url = session.full_config["sso_sessions"][sso]["sso_start_url"]
    cache_dir = os.path.join(os.environ["HOME"], ".aws", "sso", "cache")
    seen = []
    failed = 0
    end = time.monotonic() + deadline
    while len(seen) < want and time.monotonic() < end:
        provider = SSOTokenProvider(session, profile_name=profile)
        try:
            frozen = provider.load_token().get_frozen_token()
        except Exception as e:  # the file is not there yet
            print(f"not yet: {type(e).__name__}", flush=True)
            time.sleep(0.05)
            continue
        now = datetime.datetime.now(datetime.timezone.utc)
        digest = hashlib.sha256(frozen.token.encode()).hexdigest()
        if frozen.expiration <= now:
            print(f"FAIL expired token {digest}", flush=True)
            failed += 1
        if digest not in seen:
            seen.append(digest)
            left = (frozen.expiration - now).total_seconds()
            print(f"token {digest} expires_in {left:.1f}", flush=True)
        time.sleep(0.05)
    # What botocore read is what the sink holds, and the sink never hands
    # an SDK the means to refresh (and so rotate the proxy's token).
    # (botocore found it under the AWS CLI's name, or it would have read nothing.)
    name = hashlib.sha1(sso.encode()).hexdigest() + ".json"
    with open(os.path.join(cache_dir, name)) as f:
        on_disk = json.load(f)
    for key in ("refreshToken", "clientSecret", "clientId"):
        if key in on_disk:
            print(f"FAIL the sink holds {key}", flush=True)
            failed += 1
    if on_disk.get("startUrl") != start_url:
        print("FAIL startUrl differs", flush=True)
        failed += 1
    if len(seen) < want:
        print(f"FAIL only {len(seen)} of {want} tokens within {deadline} s", flush=True)
        failed += 1
    print(f"botocore sink: {len(seen)} tokens, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
