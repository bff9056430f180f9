#!/usr/bin/python3
"""Strict AWS STS emulator of the local RDS IAM lab (standard library only).

Serves the awsQuery protocol on 127.0.0.1 (POST / with a form body, as the AWS
SDKs send it when AWS_ENDPOINT_URL_STS points here):

  AssumeRole         SigV4 checked with the caller's secret, session token
                     checked (MAC + expiry), trust policy and ExternalId of the
                     role from lab.json enforced, DurationSeconds range, role
                     MaxSessionDuration and the 1-hour role-chaining cap.
  GetCallerIdentity  who am I.
  AssumeRoleWithWebIdentity  UNSIGNED (like AWS); the WebIdentityToken is a lab
                     JWT (HS256, key = HMAC-SHA256(master, "lab-oidc-hs256-key"))
                     checked for issuer, signature, expiry and audience; the role
                     must trust the lab OIDC provider (and its subject).
  GET /lab/health    liveness probe for lab.py (not an AWS API).

On the same port, the other sources of the AWS default credential chain:

  IMDSv2             PUT /latest/api/token (X-aws-ec2-metadata-token-ttl-seconds
                     1..21600), then GETs with X-aws-ec2-metadata-token (else
                     401): meta-data/iam/security-credentials/[ROLE], iam/info,
                     placement/region, placement/availability-zone, instance-id,
                     dynamic/instance-identity/document.  lab.json "imds".
  ECS / EKS          GET /ecs/credentials with Authorization: <lab.json
                     ecs.auth_token> (AWS_CONTAINER_CREDENTIALS_FULL_URI).

All issued credentials follow the same rules as AssumeRole's (derived secret,
MAC'ed session token naming the role and session), so the verifier and the
next AssumeRole hop accept them.

Credentials are stateless: the secret of any key id is derived from the lab
master secret (base64(HMAC-SHA256(master, "secret:"+akid))[:40]) and the
session token is a self-describing blob MAC'ed with the master secret, so the
verifier can check both without talking to this process.  One JSON line per
API call goes to the STS log (lab.json sts.log); no secret is ever logged.

Usage: sts.py --conf DIR/lab.json [--port 0] [--port-file DIR/sts.port]
"""
import argparse
import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import struct
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.sax.saxutils import escape

NS = "https://sts.amazonaws.com/doc/2011-06-15/"
UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
TOKEN_MAGIC = b"LABSTS1\x00"
MAX_SKEW = 15 * 60
CHAIN_CAP = 3600
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
ECS_PATH = "/ecs/credentials"


class StsError(Exception):
    def __init__(self, status, code, message, typ="Sender"):
        super().__init__(message)
        self.status, self.code, self.message, self.typ = status, code, message, typ


def uri_encode(s, keep_slash=False):
    safe = UNRESERVED | ({ord("/")} if keep_slash else set())
    return "".join(chr(b) if b in safe else "%%%02X" % b for b in s.encode("utf-8"))


def derive_secret(master, akid):
    mac = hmac.new(master, b"secret:" + akid.encode("ascii"), hashlib.sha256).digest()
    return base64.b64encode(mac).decode("ascii")[:40]


def stable_id(prefix, master, what):
    """Deterministic AIDA.../AROA... style ids (21 chars)."""
    d = hmac.new(master, b"id:" + what.encode(), hashlib.sha256).digest()
    return prefix + base64.b32encode(d).decode()[:21 - len(prefix)]


def make_session_token(master, payload):
    """MAC'ed, self-describing, no secret inside; random filler makes it
    ~1,200 chars of standard base64 (with + / =) like real STS tokens."""
    pj = json.dumps(payload, separators=(",", ":")).encode()
    body = TOKEN_MAGIC + struct.pack(">H", len(pj)) + pj + secrets.token_bytes(480)
    mac = hmac.new(master, b"lab-session-token\x00" + body, hashlib.sha256).digest()
    return base64.b64encode(body + mac).decode("ascii")


def read_session_token(master, token):
    try:
        blob = base64.b64decode(token.encode("ascii"), validate=True)
    except Exception:
        return None
    if len(blob) < len(TOKEN_MAGIC) + 2 + 32 or not blob.startswith(TOKEN_MAGIC):
        return None
    body, mac = blob[:-32], blob[-32:]
    if not hmac.compare_digest(mac, hmac.new(master, b"lab-session-token\x00" + body, hashlib.sha256).digest()):
        return None
    (n,) = struct.unpack(">H", body[len(TOKEN_MAGIC):len(TOKEN_MAGIC) + 2])
    try:
        return json.loads(body[len(TOKEN_MAGIC) + 2:len(TOKEN_MAGIC) + 2 + n])
    except ValueError:
        return None


def iso(ts):
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def amz(ts):
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def issue_session(master, role_arn, session_name, src_arn, now, duration, chained, via=None):
    """New temporary credentials for role_arn/session_name (every source uses this)."""
    akid = "ASIA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(16))
    exp = int(now) + duration
    account = role_arn.split(":")[4]
    role_name = role_arn.split(":", 5)[5].split("/")[-1]
    assumed_arn = "arn:aws:sts::%s:assumed-role/%s/%s" % (account, role_name, session_name)
    payload = {"v": 1, "akid": akid, "role_arn": role_arn, "assumed_role_arn": assumed_arn,
               "session_name": session_name, "src_arn": src_arn, "iat": int(now), "exp": exp, "chained": chained}
    if via:
        payload["via"] = via
    return {"akid": akid, "secret": derive_secret(master, akid), "token": make_session_token(master, payload),
            "exp": exp, "assumed_arn": assumed_arn, "role_id": stable_id("AROA", master, role_arn)}


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(s):
    if not re.fullmatch(r"[A-Za-z0-9_-]+", s):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def oidc_key(master):
    """HS256 key of the lab OIDC provider (lab.py mints the web identity token with it)."""
    return hmac.new(master, b"lab-oidc-hs256-key", hashlib.sha256).digest()


IMDS_TOKEN_VERSION = b"\x01"


def make_imds_token(master, ttl, now):
    raw = IMDS_TOKEN_VERSION + struct.pack(">I", int(now) + ttl) + secrets.token_bytes(8)
    mac = hmac.new(master, b"lab-imds-token\x00" + raw, hashlib.sha256).digest()[:20]
    return base64.urlsafe_b64encode(raw + mac).decode("ascii")


def imds_token_ok(master, token, now):
    try:
        blob = base64.urlsafe_b64decode(token.encode("ascii"))
    except Exception:
        return False
    if len(blob) != 33 or blob[:1] != IMDS_TOKEN_VERSION:
        return False
    raw, mac = blob[:13], blob[13:]
    if not hmac.compare_digest(mac, hmac.new(master, b"lab-imds-token\x00" + raw, hashlib.sha256).digest()[:20]):
        return False
    return now < struct.unpack(">I", raw[1:5])[0]


def new_rec(rid, action=None):
    return {"ts": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "action": action, "caller_arn": None, "caller_akid": None, "role_arn": None,
            "session_name": None, "external_id_ok": None, "duration": None, "issued_akid": None,
            "expiration": None, "ok": False, "code": None, "message": None, "region": None,
            "request_id": rid}


def write_log(rec):
    try:
        path = LAB.conf["sts"]["log"]
        with LOG_LOCK, open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    except Exception as e:
        sys.stderr.write("sts: cannot log: %s\n" % e)


class Lab:
    """lab.json, re-read when it changes (lab.py rewrites it atomically)."""

    def __init__(self, path):
        self.path, self.mtime, self.conf, self.master = path, None, None, None
        self.lock = threading.Lock()
        self.reload()

    def reload(self):
        with self.lock:
            st = os.stat(self.path)
            if st.st_mtime_ns != self.mtime:
                with open(self.path) as f:
                    conf = json.load(f)
                with open(conf["master_secret_file"], "rb") as f:
                    self.master = f.read().strip()
                self.conf, self.mtime = conf, st.st_mtime_ns
            return self.conf, self.master


LAB = None
LOG_LOCK = threading.Lock()


def denied(caller_arn, role_arn):
    return StsError(403, "AccessDenied", "User: %s is not authorized to perform: sts:AssumeRole on resource: %s"
                    % (caller_arn, role_arn))


def validation(msg):
    return StsError(400, "ValidationError", msg)


def validate_common(form, conf, rec, extra=None):
    """RoleArn, RoleSessionName and DurationSeconds as AWS validates them; returns the duration."""
    role_arn, name, dur_s = form.get("RoleArn"), form.get("RoleSessionName"), form.get("DurationSeconds")
    rec["role_arn"], rec["session_name"] = role_arn, name
    errs = []
    if role_arn is None:
        errs.append("Value null at 'roleArn' failed to satisfy constraint: Member must not be null")
    elif not 20 <= len(role_arn) <= 2048:
        errs.append("Value '%s' at 'roleArn' failed to satisfy constraint: Member must have length "
                    "between 20 and 2048" % role_arn)
    if name is None:
        errs.append("Value null at 'roleSessionName' failed to satisfy constraint: Member must not be null")
    elif not re.fullmatch(r"[\w+=,.@-]{2,64}", name, re.ASCII):
        errs.append("Value '%s' at 'roleSessionName' failed to satisfy constraint: Member must satisfy "
                    "regular expression pattern: [\\w+=,.@-]* and have length between 2 and 64" % name)
    errs += extra or []
    stsconf = conf.get("sts", {})
    min_d = int(stsconf.get("min_duration_seconds", 900))
    duration = 3600
    if dur_s is not None:
        if not re.fullmatch(r"-?\d{1,9}", dur_s):
            errs.append("Value '%s' at 'durationSeconds' failed to satisfy constraint: Member must be a "
                        "number" % dur_s)
        else:
            duration = int(dur_s)
            if duration < min_d:
                errs.append("Value '%d' at 'durationSeconds' failed to satisfy constraint: Member must have "
                            "value greater than or equal to %d" % (duration, min_d))
            elif duration > 43200:
                errs.append("Value '%d' at 'durationSeconds' failed to satisfy constraint: Member must have "
                            "value less than or equal to 43200" % duration)
    rec["duration"] = duration
    if errs:
        raise validation("%d validation error%s detected: %s" % (len(errs), "s" if len(errs) > 1 else "",
                                                                 "; ".join(errs)))
    return duration


def bad_jwt(msg):
    return StsError(400, "InvalidIdentityToken", msg)


def verify_web_identity_token(master, token, conf, now):
    """Claims of a lab OIDC JWT; raise StsError like AWS would."""
    wi = conf.get("web_identity") or {}
    parts = token.split(".")
    try:
        if len(parts) != 3:
            raise ValueError
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
        sig = b64url_decode(parts[2])
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise ValueError
    except ValueError:
        hint = " (the lab refuses whitespace in it: no trailing newline in the token file)" \
            if any(c.isspace() for c in token) else ""
        raise bad_jwt("The ID Token provided is not a valid JWT. (You may see this error if you sent an Access "
                      "Token)" + hint)
    iss = claims.get("iss")
    if not wi.get("issuer") or iss != wi["issuer"]:
        raise bad_jwt("No OpenIDConnect provider found in your account for %s" % iss)
    if header.get("alg") != "HS256":
        raise bad_jwt("The ID Token is signed with an unsupported algorithm (%s)" % header.get("alg"))
    want = hmac.new(oidc_key(master), (parts[0] + "." + parts[1]).encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(want, sig):
        raise bad_jwt("Couldn't verify the signature of the ID Token")
    for c in ("sub", "aud", "exp", "iat"):
        if c not in claims:
            raise bad_jwt("The ID Token is missing the required claim '%s'" % c)
    if not isinstance(claims["exp"], int) or not isinstance(claims["iat"], int):
        raise bad_jwt("The ID Token has a malformed exp or iat claim")
    if now >= claims["exp"]:
        raise StsError(400, "ExpiredTokenException", "Token expired: current date/time %d must be before the "
                       "expiration date/time %d" % (int(now), claims["exp"]))
    if claims["iat"] > now + 300 or (isinstance(claims.get("nbf"), int) and claims["nbf"] > now + 300):
        raise bad_jwt("The ID Token is not yet valid (iat/nbf in the future)")
    aud = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    if wi.get("audience") not in aud:
        raise bad_jwt("Incorrect token audience")
    return claims


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lab-sts"
    sys_version = ""

    def log_message(self, fmt, *args):  # quiet: the JSON log is the record
        pass

    # ---- plumbing -------------------------------------------------------
    def read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
                if len(out) > 1 << 20:
                    raise StsError(413, "RequestEntityTooLarge", "body too large")
        n = int(self.headers.get("Content-Length") or 0)
        if n > 1 << 20:
            raise StsError(413, "RequestEntityTooLarge", "body too large")
        return self.rfile.read(n) if n else b""

    def send(self, status, body, ctype="text/xml", rid=None, headers=None):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if rid:
            self.send_header("x-amzn-RequestId", rid)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/lab/health":
            return self.send(200, '{"ok":true}\n', "application/json")
        if path == "/latest" or path.startswith("/latest/"):
            return self.imds("GET", path)
        if path == ECS_PATH:
            return self.ecs()
        self.handle_api(b"")

    def do_PUT(self):
        path = self.path.split("?")[0]
        try:
            self.read_body()
        except StsError as e:
            self.close_connection = True
            return self.send(e.status, e.message + "\n", "text/plain")
        if path == "/latest" or path.startswith("/latest/"):
            return self.imds("PUT", path)
        self.send(405, "Method Not Allowed\n", "text/plain")

    # ---- IMDSv2 ---------------------------------------------------------
    def imds(self, method, path):
        """EC2 instance metadata (IMDSv2 only, like an instance with HttpTokens=required)."""
        rid, now = str(uuid.uuid4()), time.time()
        rec = new_rec(rid, "IMDS")
        rec["path"] = path
        log = False
        try:
            conf, master = LAB.reload()
            im = conf.get("imds")
            if not im:
                raise StsError(404, "NotFound", "IMDS is not configured in lab.json")
            if method == "PUT":
                if path != "/latest/api/token":
                    raise StsError(405, "MethodNotAllowed", "PUT is only for /latest/api/token")
                if self.headers.get("X-Forwarded-For") is not None:
                    log = True
                    raise StsError(403, "Forbidden", "X-Forwarded-For is not allowed on a token request")
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                if ttl is None or not re.fullmatch(r"\d{1,5}", ttl.strip()) or not 1 <= int(ttl) <= 21600:
                    log = True
                    raise StsError(400, "BadRequest", "X-aws-ec2-metadata-token-ttl-seconds must be 1..21600")
                return self.send(200, make_imds_token(master, int(ttl), now), "text/plain",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": str(int(ttl))})
            if path == "/latest/api/token":
                raise StsError(405, "MethodNotAllowed", "the token is issued by PUT")
            tok = self.headers.get("X-aws-ec2-metadata-token")
            if tok is None or not imds_token_ok(master, tok, now):
                log = True
                raise StsError(401, "Unauthorized", "missing, invalid or expired X-aws-ec2-metadata-token "
                               "(IMDSv2 is required)")
            region, role_name, iid = conf["region"], im["role_name"], im["instance_id"]
            account = im["role_arn"].split(":")[4]
            creds_dir = "/latest/meta-data/iam/security-credentials"
            if path in (creds_dir, creds_dir + "/"):
                return self.send(200, role_name, "text/plain")  # no trailing newline: the SDK does not trim
            if path.startswith(creds_dir + "/"):
                log = True
                if path[len(creds_dir) + 1:] != role_name:
                    raise StsError(404, "NotFound", "no instance profile role %s" % path[len(creds_dir) + 1:][:80])
                rec["role_arn"], rec["session_name"] = im["role_arn"], iid
                rec["duration"] = int(im.get("credential_seconds", 21600))
                s = issue_session(master, im["role_arn"], iid, "ec2.amazonaws.com", now, rec["duration"], False,
                                  "imds")
                rec["issued_akid"], rec["expiration"] = s["akid"], iso(s["exp"])
                rec["ok"], rec["code"] = True, "OK"
                return self.send(200, json.dumps({
                    "Code": "Success", "LastUpdated": iso(now), "Type": "AWS-HMAC", "AccessKeyId": s["akid"],
                    "SecretAccessKey": s["secret"], "Token": s["token"], "Expiration": iso(s["exp"])},
                    indent=2), "text/plain")
            ident = {"accountId": account, "architecture": "x86_64", "availabilityZone": region + "a",
                     "imageId": "ami-0lab0000000000001", "instanceId": iid, "instanceType": "t3.micro",
                     "pendingTime": iso(conf.get("started", now)), "privateIp": "127.0.0.1", "region": region,
                     "version": "2017-09-30"}
            simple = {
                "/latest/meta-data/placement/region": region,
                "/latest/meta-data/placement/availability-zone": region + "a",
                "/latest/meta-data/instance-id": iid,
                "/latest/meta-data/iam/info": json.dumps({
                    "Code": "Success", "LastUpdated": iso(now),
                    "InstanceProfileArn": "arn:aws:iam::%s:instance-profile/%s" % (account, role_name),
                    "InstanceProfileId": stable_id("AIPA", master, role_name)}, indent=2),
                "/latest/dynamic/instance-identity/document": json.dumps(ident, indent=2),
                "/latest/meta-data/": "iam/\ninstance-id\nplacement/",
                "/latest/meta-data/iam/": "info\nsecurity-credentials/",
                "/latest/meta-data/placement/": "availability-zone\nregion",
            }
            if path in simple:
                return self.send(200, simple[path], "text/plain")
            raise StsError(404, "NotFound", "Not Found")
        except StsError as e:
            rec["code"], rec["message"] = e.code, e.message
            self.send(e.status, e.message + "\n", "text/plain")
        except Exception as e:
            log = True
            rec["code"], rec["message"] = "InternalFailure", "%s: %s" % (type(e).__name__, e)
            self.send(500, "Internal Server Error\n", "text/plain")
        finally:
            if log:
                write_log(rec)

    # ---- ECS / EKS container credentials --------------------------------
    def ecs(self):
        rid, now = str(uuid.uuid4()), time.time()
        rec = new_rec(rid, "ECS")
        try:
            conf, master = LAB.reload()
            ec = conf.get("ecs")
            if not ec:
                raise StsError(404, "NotFound", "ECS is not configured in lab.json")
            auth = self.headers.get("Authorization")
            if auth is None:
                raise StsError(401, "Unauthorized", "missing Authorization header (AWS_CONTAINER_AUTHORIZATION_TOKEN)")
            if not hmac.compare_digest(auth.encode("utf-8", "replace"), ec["auth_token"].encode()):
                raise StsError(403, "AccessDenied", "the Authorization header is not the lab's container token")
            rec["role_arn"], rec["session_name"] = ec["role_arn"], ec["task_id"]
            rec["duration"] = int(ec.get("credential_seconds", 21600))
            s = issue_session(master, ec["role_arn"], ec["task_id"], "ecs-tasks.amazonaws.com", now, rec["duration"],
                              False, "ecs")
            rec["issued_akid"], rec["expiration"] = s["akid"], iso(s["exp"])
            rec["ok"], rec["code"] = True, "OK"
            self.send(200, json.dumps({"RoleArn": ec["role_arn"], "AccessKeyId": s["akid"],
                                       "SecretAccessKey": s["secret"], "Token": s["token"],
                                       "Expiration": iso(s["exp"])}), "application/json")
        except StsError as e:
            rec["code"], rec["message"] = e.code, e.message
            self.send(e.status, json.dumps({"code": e.code, "message": e.message}), "application/json")
        except Exception as e:
            rec["code"], rec["message"] = "InternalFailure", "%s: %s" % (type(e).__name__, e)
            self.send(500, json.dumps({"code": "InternalFailure", "message": "internal error"}), "application/json")
        finally:
            write_log(rec)

    def do_POST(self):
        try:
            body = self.read_body()
        except StsError as e:
            self.close_connection = True
            return self.send(e.status, self.error_xml(e, str(uuid.uuid4())))
        self.handle_api(body)

    def error_xml(self, e, rid):
        return ('<ErrorResponse xmlns="%s">\n  <Error>\n    <Type>%s</Type>\n    <Code>%s</Code>\n'
                '    <Message>%s</Message>\n  </Error>\n  <RequestId>%s</RequestId>\n</ErrorResponse>\n'
                % (NS, e.typ, escape(e.code), escape(e.message), rid))

    # ---- SigV4 ----------------------------------------------------------
    def authenticate(self, body, form, conf, master, now, rec):
        """Return the caller dict; raise StsError like AWS would."""
        auth = self.headers.get("Authorization")
        if not auth:
            raise StsError(403, "MissingAuthenticationToken", "Request is missing Authentication Token")
        m = re.fullmatch(r"AWS4-HMAC-SHA256\s+(.*)", auth.strip())
        if not m:
            raise StsError(400, "IncompleteSignature", "Unsupported Authorization scheme (want AWS4-HMAC-SHA256)")
        fields = {}
        for part in m.group(1).split(","):
            k, _, v = part.strip().partition("=")
            fields[k] = v
        if not all(k in fields for k in ("Credential", "SignedHeaders", "Signature")):
            raise StsError(400, "IncompleteSignature",
                           "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature'.")
        cred = fields["Credential"].split("/")
        if len(cred) != 5 or cred[4] != "aws4_request":
            raise StsError(400, "IncompleteSignature", "Malformed Credential in Authorization header")
        akid, cdate, region, service, _ = cred
        rec["caller_akid"], rec["region"] = akid, region

        # who is calling: the long-term base key, or a session we issued
        token = self.headers.get("X-Amz-Security-Token") or form.get("X-Amz-Security-Token")
        base = conf["base"]
        if akid == base["access_key_id"]:
            if token is not None:
                raise StsError(403, "InvalidClientTokenId", "The security token included in the request is invalid.")
            caller = {"arn": base["arn"], "principals": [base["arn"]], "session": None,
                      "account": base["arn"].split(":")[4],
                      "user_id": stable_id("AIDA", master, base["arn"])}
        elif re.fullmatch(r"ASIA[A-Z0-9]{16}", akid):
            st = read_session_token(master, token) if token else None
            if st is None or st.get("akid") != akid:
                raise StsError(403, "InvalidClientTokenId", "The security token included in the request is invalid.")
            if now >= st["exp"]:
                raise StsError(403, "ExpiredToken", "The security token included in the request is expired")
            caller = {"arn": st["assumed_role_arn"], "principals": [st["role_arn"], st["assumed_role_arn"]],
                      "session": st, "account": st["role_arn"].split(":")[4],
                      "user_id": stable_id("AROA", master, st["role_arn"]) + ":" + st["session_name"]}
        else:
            raise StsError(403, "InvalidClientTokenId", "The security token included in the request is invalid.")
        rec["caller_arn"] = caller["arn"]

        # time and scope
        amz_date = self.headers.get("X-Amz-Date")
        if amz_date is None:
            raise StsError(400, "IncompleteSignature", "Authorization header requires existence of either a "
                           "'X-Amz-Date' or a 'Date' header.")
        try:
            t = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc).timestamp()
        except ValueError:
            raise StsError(400, "IncompleteSignature", "Malformed X-Amz-Date")
        if t < now - MAX_SKEW:
            raise StsError(403, "SignatureDoesNotMatch", "Signature expired: %s is now earlier than %s (%s - 15 min.)"
                           % (amz_date, amz(now - MAX_SKEW), amz(now)))
        if t > now + MAX_SKEW:
            raise StsError(403, "SignatureDoesNotMatch", "Signature not yet current: %s is still later than %s "
                           "(%s + 15 min.)" % (amz_date, amz(now + MAX_SKEW), amz(now)))
        if cdate != amz_date[:8]:
            raise StsError(403, "SignatureDoesNotMatch", "Credential should be scoped to a valid date: %s" % cdate)
        if service != "sts":
            raise StsError(403, "SignatureDoesNotMatch", "Credential should be scoped to correct service: 'sts'. ")
        if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d+", region):
            raise StsError(403, "SignatureDoesNotMatch", "Credential should be scoped to a valid region. ")

        # canonical request from the headers the client says it signed
        signed = fields["SignedHeaders"].split(";")
        if signed != sorted(signed) or signed != [h.lower() for h in signed] or "host" not in signed:
            raise StsError(403, "SignatureDoesNotMatch", "SignedHeaders must be sorted, lower case and include host")
        if "x-amz-date" not in signed:
            raise StsError(403, "SignatureDoesNotMatch", "x-amz-date must be signed")
        canon_headers = ""
        for h in signed:
            vals = self.headers.get_all(h)
            if vals is None:
                raise StsError(403, "SignatureDoesNotMatch", "Signed header %s is missing" % h)
            canon_headers += h + ":" + ",".join(" ".join(v.split()) for v in vals) + "\n"
        path, _, rawq = self.path.partition("?")
        canon_uri = "/".join(uri_encode(seg) for seg in path.split("/")) or "/"
        qpairs = sorted((uri_encode(urllib.parse.unquote(k)), uri_encode(urllib.parse.unquote(v)))
                        for k, _, v in (p.partition("=") for p in rawq.split("&") if p))
        canon_q = "&".join("%s=%s" % kv for kv in qpairs)
        body_hash = hashlib.sha256(body).hexdigest()
        declared = self.headers.get("x-amz-content-sha256")
        if declared is not None and declared != "UNSIGNED-PAYLOAD" and declared != body_hash:
            raise StsError(400, "XAmzContentSHA256Mismatch",
                           "The provided 'x-amz-content-sha256' header does not match what was computed.")
        payload_hash = declared if declared is not None else body_hash
        canonical = "\n".join([self.command, canon_uri, canon_q, canon_headers, ";".join(signed), payload_hash])
        scope = "/".join(cred[1:])
        sts_str = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        k = hmac.new(("AWS4" + derive_secret(master, akid)).encode(), cdate.encode(), hashlib.sha256).digest()
        for part in (region, service, "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        want = hmac.new(k, sts_str.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want.encode(), fields["Signature"].encode("ascii", "replace")):
            raise StsError(403, "SignatureDoesNotMatch",
                           "The request signature we calculated does not match the signature you provided. Check "
                           "your AWS Secret Access Key and signing method. Consult the service documentation for "
                           "details.")
        return caller

    # ---- API ------------------------------------------------------------
    def handle_api(self, body):
        rid = str(uuid.uuid4())
        now = time.time()
        rec = new_rec(rid)
        try:
            conf, master = LAB.reload()
            form = {}
            for k, v in urllib.parse.parse_qsl(self.path.partition("?")[2], keep_blank_values=True) + \
                    urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
                form.setdefault(k, v)
            rec["action"] = form.get("Action")
            if self.path.partition("?")[0] != "/":
                raise StsError(404, "UnknownOperationException", "Unknown path %s" % self.path.partition("?")[0][:100])
            action = form.get("Action")
            if action == "AssumeRoleWithWebIdentity":
                caller = None  # unsigned, like AWS; log the region if the client signed anyway
                m = re.search(r"Credential=[^/,\s]*/\d{8}/([^/,\s]+)/", self.headers.get("Authorization") or "")
                rec["region"] = m.group(1) if m else None
            else:
                caller = self.authenticate(body, form, conf, master, now, rec)
            if form.get("Version") != "2011-06-15":
                raise StsError(400, "InvalidAction", "Could not find operation %s for version %s"
                               % (action, form.get("Version")))
            if action == "AssumeRole":
                xml = self.assume_role(form, caller, conf, master, now, rec, rid)
            elif action == "AssumeRoleWithWebIdentity":
                xml = self.assume_role_with_web_identity(form, conf, master, now, rec, rid)
            elif action == "GetCallerIdentity":
                xml = ('<GetCallerIdentityResponse xmlns="%s">\n  <GetCallerIdentityResult>\n'
                       '    <Arn>%s</Arn>\n    <UserId>%s</UserId>\n    <Account>%s</Account>\n'
                       '  </GetCallerIdentityResult>\n  <ResponseMetadata>\n    <RequestId>%s</RequestId>\n'
                       '  </ResponseMetadata>\n</GetCallerIdentityResponse>\n'
                       % (NS, escape(caller["arn"]), escape(caller["user_id"]), caller["account"], rid))
            else:
                raise StsError(400, "InvalidAction", "Could not find operation %s for version 2011-06-15" % action)
            rec["ok"], rec["code"] = True, "OK"
            self.send(200, xml, rid=rid)
        except StsError as e:
            rec["code"], rec["message"] = e.code, e.message
            self.send(e.status, self.error_xml(e, rid), rid=rid)
        except Exception as e:  # a bug: say so, like AWS's InternalFailure
            rec["code"], rec["message"] = "InternalFailure", "%s: %s" % (type(e).__name__, e)
            self.send(500, self.error_xml(StsError(500, "InternalFailure", "internal error", "Receiver"), rid), rid=rid)
        finally:
            write_log(rec)

    def assume_role(self, form, caller, conf, master, now, rec, rid):
        role_arn, name, ext = form.get("RoleArn"), form.get("RoleSessionName"), form.get("ExternalId")
        extra = []
        if ext is not None and not re.fullmatch(r"[\w+=,.@:/-]{2,1224}", ext, re.ASCII):
            extra.append("Value at 'externalId' failed to satisfy constraint: Member must satisfy regular "
                         "expression pattern: [\\w+=,.@:\\/-]* and have length between 2 and 1224")
        duration = validate_common(form, conf, rec, extra)
        role = next((r for r in conf["roles"].values() if r["arn"] == role_arn), None)
        if role is None:
            raise denied(caller["arn"], role_arn)
        trusts = role.get("trusts", [])
        trusted = any(p in trusts for p in caller["principals"]) or \
            ("arn:aws:iam::%s:root" % caller["account"]) in trusts
        if not trusted:
            raise denied(caller["arn"], role_arn)
        if role.get("external_id") is not None:
            rec["external_id_ok"] = ext is not None and hmac.compare_digest(ext.encode(), role["external_id"].encode())
            if not rec["external_id_ok"]:
                raise denied(caller["arn"], role_arn)
        if caller["session"] is not None and duration > CHAIN_CAP:
            raise validation("The requested DurationSeconds exceeds the 1 hour session limit for roles assumed "
                             "by role chaining.")
        if duration > int(role.get("max_session_duration", 3600)):
            raise validation("The requested DurationSeconds exceeds the MaxSessionDuration set for this role.")

        ses = issue_session(master, role_arn, name, caller["arn"], now, duration, caller["session"] is not None)
        akid, exp, assumed_arn, role_id, token = (ses[k] for k in ("akid", "exp", "assumed_arn", "role_id", "token"))
        rec["issued_akid"], rec["expiration"] = akid, iso(exp)
        return ('<AssumeRoleResponse xmlns="%s">\n  <AssumeRoleResult>\n    <AssumedRoleUser>\n'
                '      <AssumedRoleId>%s:%s</AssumedRoleId>\n      <Arn>%s</Arn>\n    </AssumedRoleUser>\n'
                '    <Credentials>\n      <AccessKeyId>%s</AccessKeyId>\n      <SecretAccessKey>%s</SecretAccessKey>\n'
                '      <SessionToken>%s</SessionToken>\n      <Expiration>%s</Expiration>\n    </Credentials>\n'
                '  </AssumeRoleResult>\n  <ResponseMetadata>\n    <RequestId>%s</RequestId>\n  </ResponseMetadata>\n'
                '</AssumeRoleResponse>\n'
                % (NS, role_id, escape(name), escape(assumed_arn), akid, derive_secret(master, akid), token,
                   iso(exp), rid))

    def assume_role_with_web_identity(self, form, conf, master, now, rec, rid):
        tok = form.get("WebIdentityToken")
        extra = []
        if tok is None:
            extra.append("Value null at 'webIdentityToken' failed to satisfy constraint: Member must not be null")
        elif not 4 <= len(tok) <= 20000:
            extra.append("Value at 'webIdentityToken' failed to satisfy constraint: Member must have length "
                         "between 4 and 20000")
        duration = validate_common(form, conf, rec, extra)
        role_arn, name = form["RoleArn"], form["RoleSessionName"]
        claims = verify_web_identity_token(master, tok, conf, now)
        wi = conf["web_identity"]
        provider = wi["provider_arn"]
        rec["caller_arn"], rec["subject"] = provider, claims["sub"]
        role = next((r for r in conf["roles"].values() if r["arn"] == role_arn), None)
        if role is None or provider not in role.get("trusts", []) or \
                (role.get("oidc_sub") is not None and role["oidc_sub"] != claims["sub"]):
            raise StsError(403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")
        if duration > int(role.get("max_session_duration", 3600)):
            raise validation("The requested DurationSeconds exceeds the MaxSessionDuration set for this role.")
        s = issue_session(master, role_arn, name, provider + ":" + claims["sub"], now, duration, False,
                          "web_identity")
        rec["issued_akid"], rec["expiration"] = s["akid"], iso(s["exp"])
        aud = claims["aud"] if isinstance(claims["aud"], str) else wi["audience"]
        return ('<AssumeRoleWithWebIdentityResponse xmlns="%s">\n  <AssumeRoleWithWebIdentityResult>\n'
                '    <Audience>%s</Audience>\n    <AssumedRoleUser>\n      <AssumedRoleId>%s:%s</AssumedRoleId>\n'
                '      <Arn>%s</Arn>\n    </AssumedRoleUser>\n    <Provider>%s</Provider>\n    <Credentials>\n'
                '      <AccessKeyId>%s</AccessKeyId>\n      <SecretAccessKey>%s</SecretAccessKey>\n'
                '      <SessionToken>%s</SessionToken>\n      <Expiration>%s</Expiration>\n    </Credentials>\n'
                '    <SubjectFromWebIdentityToken>%s</SubjectFromWebIdentityToken>\n'
                '  </AssumeRoleWithWebIdentityResult>\n  <ResponseMetadata>\n    <RequestId>%s</RequestId>\n'
                '  </ResponseMetadata>\n</AssumeRoleWithWebIdentityResponse>\n'
                % (NS, escape(aud), s["role_id"], escape(name), escape(s["assumed_arn"]), escape(provider),
                   s["akid"], s["secret"], s["token"], iso(s["exp"]), escape(claims["sub"]), rid))


def main():
    global LAB
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conf", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    a = ap.parse_args()
    LAB = Lab(a.conf)
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    srv = ThreadingHTTPServer((a.host, a.port), Handler)
    port = srv.server_address[1]
    if a.port_file:
        tmp = a.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.replace(tmp, a.port_file)
    sys.stderr.write("sts: listening on http://%s:%d pid %d\n" % (a.host, port, os.getpid()))
    sys.stderr.flush()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
