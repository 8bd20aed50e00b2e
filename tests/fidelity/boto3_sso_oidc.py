#!/usr/bin/env python3
"""Fidelity check: a real AWS SDK (boto3's sso-oidc client) against the
built-in emulator.

Usage: python3 tests/fidelity/boto3_sso_oidc.py path/to/sso-token-proxy

Starts `sso-token-proxy emulator --listen 127.0.0.1:0`, points boto3 at it
with endpoint_url, and checks that RegisterClient, StartDeviceAuthorization
and CreateToken (device code and refresh token grants) succeed and that
injected faults surface in boto3 as the modelled exceptions with the right
HTTP status. Then CreateTokenWithIAM, signed by botocore's own SigV4 signer
with the emulator's test credentials: the emulator's verifier must accept
that signature (an independent check of it), refuse a wrong secret key and
an unknown key id, and every modelled exception must reach boto3 as its
class. Exits non-zero if any check failed.
"""

import base64
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


def expect_error(name, call, code, status, modelled=True):
    """`modelled`: boto3 raises the model's exception class; else a plain
    ClientError carrying the code (errors of AWS's authentication layer)."""
    try:
        call()
    except Exception as e:  # botocore.exceptions.ClientError subclasses
        response = getattr(e, "response", {})
        got_code = response.get("Error", {}).get("Code")
        got_status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        expected_class = code if modelled else "ClientError"
        check(
            f"{name} -> {code} ({status})",
            got_code == code and got_status == status and type(e).__name__ == expected_class,
            f"got {type(e).__name__} code={got_code} status={got_status}",
        )
        return
    check(f"{name} -> {code}", False, "no error raised")


def get(url, token):
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def token_subject(access_token):
    """The emulator encodes the user in its CreateTokenWithIAM tokens:
    `aoi.<base64url(subject)>.<random>`."""
    if not access_token.startswith("aoi."):
        return None
    encoded = access_token.split(".")[1]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()


def printed(lines, label):
    for line in lines:
        m = re.search(label + r":\s+(\S+)", line)
        if m:
            return m.group(1)
    return None


def iam_client(base, key_id, secret_key):
    # Signed: botocore's SigV4 signer with the signing name from the model.
    return boto3.client(
        "sso-oidc",
        region_name="us-east-1",
        endpoint_url=base,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret_key,
        config=Config(retries={"total_max_attempts": 1}),
    )


def create_token_with_iam_checks(base, app_arn, key_id, secret_key):
    jwt_bearer = "urn:ietf:params:oauth:grant-type:jwt-bearer"
    exchange = "urn:ietf:params:oauth:grant-type:token-exchange"
    access_type = "urn:ietf:params:oauth:token-type:access_token"
    client = iam_client(base, key_id, secret_key)

    assertion = admin(base, "/_emulator/jwt", {"sub": "boto3-user"})["assertion"]
    tok = client.create_token_with_iam(clientId=app_arn, grantType=jwt_bearer, assertion=assertion)
    check(
        "CreateTokenWithIAM (jwt-bearer) signed by botocore passes the emulator's SigV4 check",
        bool(tok.get("accessToken")) and tok.get("tokenType") == "Bearer" and isinstance(tok.get("expiresIn"), int)
        and bool(tok.get("idToken")) and tok.get("issuedTokenType") == access_type
        and isinstance(tok.get("scope"), list)
        and bool(tok.get("awsAdditionalDetails", {}).get("identityContext")),
        f"got keys {sorted(tok)}",
    )
    check(
        "the issued token names the assertion's subject",
        token_subject(tok["accessToken"]) == "boto3-user"
        and get(base + "/anything", tok["accessToken"]).get("subject") == "boto3-user",
    )

    other = "arn:aws:sso::111122223333:application/ssoins-1111111111111111/apl-boto3"
    admin(base, "/_emulator/applications", {"arn": other, "scopes": ["read", "write"]})
    exchanged = client.create_token_with_iam(
        clientId=other, grantType=exchange, subjectToken=tok["accessToken"],
        subjectTokenType=access_type, scope=["read"],
    )
    check(
        "CreateTokenWithIAM (token-exchange) keeps the user and narrows the scopes",
        token_subject(exchanged.get("accessToken", "")) == "boto3-user" and exchanged.get("scope") == ["read"],
    )
    expect_error(
        "exchanging a token at the application it was issued to",
        lambda: client.create_token_with_iam(
            clientId=app_arn, grantType=exchange, subjectToken=tok["accessToken"], subjectTokenType=access_type
        ),
        "InvalidGrantException",
        400,
    )
    expired = admin(base, "/_emulator/jwt", {"sub": "boto3-user", "expired": True})["assertion"]
    expect_error(
        "an expired assertion",
        lambda: client.create_token_with_iam(clientId=app_arn, grantType=jwt_bearer, assertion=expired),
        "InvalidGrantException",
        400,
    )

    wrong = iam_client(base, key_id, secret_key[:-4] + "XXXX")
    expect_error(
        "a wrong secret key",
        lambda: wrong.create_token_with_iam(clientId=app_arn, grantType=jwt_bearer, assertion=assertion),
        "InvalidSignatureException",
        403,
        modelled=False,
    )
    stranger = iam_client(base, "AKIAUNKNOWN000000000", secret_key)
    expect_error(
        "an unknown access key id",
        lambda: stranger.create_token_with_iam(clientId=app_arn, grantType=jwt_bearer, assertion=assertion),
        "UnrecognizedClientException",
        403,
        modelled=False,
    )

    for fault, code, status in [
        ("InvalidRequest", "InvalidRequestException", 400),
        ("InvalidClient", "InvalidClientException", 401),
        ("InvalidGrant", "InvalidGrantException", 400),
        ("UnauthorizedClient", "UnauthorizedClientException", 400),
        ("UnsupportedGrantType", "UnsupportedGrantTypeException", 400),
        ("InvalidScope", "InvalidScopeException", 400),
        ("AuthorizationPending", "AuthorizationPendingException", 400),
        ("SlowDown", "SlowDownException", 400),
        ("AccessDenied", "AccessDeniedException", 400),
        ("ExpiredToken", "ExpiredTokenException", 400),
        ("InternalServer", "InternalServerException", 500),
        ("InvalidRequestRegion", "InvalidRequestRegionException", 400),
    ]:
        admin(base, "/_emulator/faults", {"operation": "CreateTokenWithIAM", "faults": [fault]})
        expect_error(
            f"injected {fault} on CreateTokenWithIAM",
            lambda: client.create_token_with_iam(clientId=app_arn, grantType=jwt_bearer, assertion=assertion),
            code,
            status,
        )
    counters = json.loads(urllib.request.urlopen(base + "/_emulator/counters", timeout=10).read())
    check(
        "the emulator counted the signature failures and each IAM grant",
        counters["errors_by_kind"].get("InvalidSignature") == 1
        and counters["errors_by_kind"].get("UnrecognizedClient") == 1
        and counters["create_token_with_iam_by_grant"].get(jwt_bearer) == 2,
        f"{counters}",
    )


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
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                base = m.group(1)
            if "assertions:" in line:
                break
        if base is None:
            print("FAIL emulator did not start")
            return 1
        app_arn = printed(lines, "application ARN")
        key_id = printed(lines, "AWS access key id")
        secret_key = printed(lines, "AWS secret key")
        if not (app_arn and key_id and secret_key):
            print("FAIL emulator did not print its CreateTokenWithIAM settings")
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

        create_token_with_iam_checks(base, app_arn, key_id, secret_key)
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
