#!/usr/bin/env python3
"""Fidelity check: a real AWS SDK (boto3's sso-oidc client) against the
built-in emulator.

Usage: python3 tests/fidelity/boto3_sso_oidc.py path/to/sso-token-proxy

Starts `sso-token-proxy emulator --listen 127.0.0.1:0`, points boto3 at it
with endpoint_url, and checks that RegisterClient, StartDeviceAuthorization
and CreateToken (device code and refresh token grants) succeed and that
injected faults surface in boto3 as the modelled exceptions with the right
HTTP status. Exits non-zero on the first mismatch.
"""

import json
import re
import subprocess
import sys
import time
import urllib.request

import boto3
from botocore import UNSIGNED
from botocore.config import Config

RESULTS = {"passed": 0, "failed": 0}


def check(name, condition, detail=""):
    if condition:
        RESULTS["passed"] += 1
        print(f"ok   {name}")
    else:
        RESULTS["failed"] += 1
        print(f"FAIL {name} {detail}")


def admin(base, path, body):
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def expect_error(name, call, code, status):
    try:
        call()
    except Exception as e:  # botocore.exceptions.ClientError subclasses
        response = getattr(e, "response", {})
        got_code = response.get("Error", {}).get("Code")
        got_status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        check(
            f"{name} -> {code} ({status})",
            got_code == code and got_status == status and type(e).__name__ == code,
            f"got {type(e).__name__} code={got_code} status={got_status}",
        )
        return
    check(f"{name} -> {code}", False, "no error raised")


def main():
    binary = sys.argv[1]
    proc = subprocess.Popen(
        [binary, "emulator", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        base = None
        deadline = time.monotonic() + 30
        while base is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                base = m.group(1)
        if base is None:
            print("FAIL emulator did not start")
            return 1

        client = boto3.client(
            "sso-oidc",
            region_name="us-east-1",
            endpoint_url=base,
            config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1}),
        )

        reg = client.register_client(clientName="boto3-fidelity", clientType="public")
        check("RegisterClient returns clientId and clientSecret", bool(reg.get("clientId")) and bool(reg.get("clientSecret")))
        cid, csec = reg["clientId"], reg["clientSecret"]

        dev = client.start_device_authorization(
            clientId=cid, clientSecret=csec, startUrl="https://example.awsapps.com/start"
        )
        check(
            "StartDeviceAuthorization returns the device flow members",
            all(dev.get(k) for k in ("deviceCode", "userCode", "verificationUri", "verificationUriComplete"))
            and isinstance(dev.get("expiresIn"), int),
        )
        grant = "urn:ietf:params:oauth:grant-type:device_code"
        expect_error(
            "CreateToken before approval",
            lambda: client.create_token(clientId=cid, clientSecret=csec, grantType=grant, deviceCode=dev["deviceCode"]),
            "AuthorizationPendingException",
            400,
        )
        admin(base, "/_emulator/device/approve", {"user_code": dev["userCode"]})
        time.sleep(max(dev.get("interval") or 1, 1))
        tok = client.create_token(clientId=cid, clientSecret=csec, grantType=grant, deviceCode=dev["deviceCode"])
        check(
            "CreateToken (device_code) returns tokens",
            bool(tok.get("accessToken")) and bool(tok.get("refreshToken")) and tok.get("tokenType") == "Bearer"
            and isinstance(tok.get("expiresIn"), int),
        )

        first_refresh = tok["refreshToken"]
        refreshed = client.create_token(
            clientId=cid, clientSecret=csec, grantType="refresh_token", refreshToken=first_refresh
        )
        check(
            "CreateToken (refresh_token) rotates the refresh token",
            bool(refreshed.get("accessToken")) and refreshed.get("refreshToken") not in (None, first_refresh),
        )
        expect_error(
            "reusing a rotated refresh token",
            lambda: client.create_token(clientId=cid, clientSecret=csec, grantType="refresh_token", refreshToken=first_refresh),
            "InvalidGrantException",
            400,
        )
        expect_error(
            "wrong client secret",
            lambda: client.create_token(clientId=cid, clientSecret="wrong", grantType="refresh_token", refreshToken=refreshed["refreshToken"]),
            "InvalidClientException",
            401,
        )

        current = refreshed["refreshToken"]
        for fault, code, status in [
            ("SlowDown", "SlowDownException", 400),
            ("InternalServer", "InternalServerException", 500),
            ("InvalidGrant", "InvalidGrantException", 400),
            ("AuthorizationPending", "AuthorizationPendingException", 400),
            ("InvalidClient", "InvalidClientException", 401),
            ("ExpiredToken", "ExpiredTokenException", 400),
            ("AccessDenied", "AccessDeniedException", 400),
        ]:
            admin(base, "/_emulator/faults", {"operation": "CreateToken", "faults": [fault]})
            expect_error(
                f"injected {fault}",
                lambda: client.create_token(clientId=cid, clientSecret=csec, grantType="refresh_token", refreshToken=current),
                code,
                status,
            )
        # The script is consumed: the next call succeeds again.
        after = client.create_token(clientId=cid, clientSecret=csec, grantType="refresh_token", refreshToken=current)
        check("fault script consumed, CreateToken succeeds again", bool(after.get("accessToken")))

        admin(base, "/_emulator/faults", {"operation": "RegisterClient", "faults": ["SlowDown"]})
        expect_error(
            "injected SlowDown on RegisterClient",
            lambda: client.register_client(clientName="x", clientType="public"),
            "SlowDownException",
            400,
        )
        admin(base, "/_emulator/faults", {"operation": "StartDeviceAuthorization", "faults": ["InternalServer"]})
        expect_error(
            "injected InternalServer on StartDeviceAuthorization",
            lambda: client.start_device_authorization(clientId=cid, clientSecret=csec, startUrl="https://example.awsapps.com/start"),
            "InternalServerException",
            500,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()

    print(f"boto3 fidelity: {RESULTS['passed']} passed, {RESULTS['failed']} failed")
    return 0 if RESULTS["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
