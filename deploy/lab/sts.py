#!/usr/bin/python3
"""Strict AWS STS emulator of the local RDS IAM lab (standard library only).

Serves the awsQuery protocol on 127.0.0.1 (POST / with a form body, as the AWS
SDKs send it when AWS_ENDPOINT_URL_STS points here):

  AssumeRole         SigV4 checked with the caller's secret, session token
                     checked (MAC + expiry), trust policy and ExternalId of the
                     role from lab.json enforced, DurationSeconds range, role
                     MaxSessionDuration and the 1-hour role-chaining cap.
  GetCallerIdentity  who am I.
  GET /lab/health    liveness probe for lab.py (not an AWS API).

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

    def send(self, status, body, ctype="text/xml", rid=None):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if rid:
            self.send_header("x-amzn-RequestId", rid)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.split("?")[0] == "/lab/health":
            return self.send(200, '{"ok":true}\n', "application/json")
        self.handle_api(b"")

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
        rec = {"ts": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
               "action": None, "caller_arn": None, "caller_akid": None, "role_arn": None,
               "session_name": None, "external_id_ok": None, "duration": None, "issued_akid": None,
               "expiration": None, "ok": False, "code": None, "message": None, "region": None,
               "request_id": rid}
        try:
            conf, master = LAB.reload()
            form = {}
            for k, v in urllib.parse.parse_qsl(self.path.partition("?")[2], keep_blank_values=True) + \
                    urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
                form.setdefault(k, v)
            rec["action"] = form.get("Action")
            if self.path.partition("?")[0] != "/":
                raise StsError(404, "UnknownOperationException", "Unknown path %s" % self.path.partition("?")[0][:100])
            caller = self.authenticate(body, form, conf, master, now, rec)
            action = form.get("Action")
            if form.get("Version") != "2011-06-15":
                raise StsError(400, "InvalidAction", "Could not find operation %s for version %s"
                               % (action, form.get("Version")))
            if action == "AssumeRole":
                xml = self.assume_role(form, caller, conf, master, now, rec, rid)
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
            try:
                path = LAB.conf["sts"]["log"]
                with LOG_LOCK, open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            except Exception as e:
                sys.stderr.write("sts: cannot log: %s\n" % e)

    def assume_role(self, form, caller, conf, master, now, rec, rid):
        role_arn, name = form.get("RoleArn"), form.get("RoleSessionName")
        ext, dur_s = form.get("ExternalId"), form.get("DurationSeconds")
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
        if ext is not None and not re.fullmatch(r"[\w+=,.@:/-]{2,1224}", ext, re.ASCII):
            errs.append("Value at 'externalId' failed to satisfy constraint: Member must satisfy regular "
                        "expression pattern: [\\w+=,.@:\\/-]* and have length between 2 and 1224")
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
        role = next((r for r in conf["roles"].values() if r["arn"] == role_arn), None)
        if role is None:
            raise denied(caller["arn"], role_arn)
        account = role_arn.split(":")[4]
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

        akid = "ASIA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(16))
        exp = int(now) + duration
        role_name = role_arn.split(":", 5)[5].split("/")[-1]
        assumed_arn = "arn:aws:sts::%s:assumed-role/%s/%s" % (account, role_name, name)
        role_id = stable_id("AROA", master, role_arn)
        token = make_session_token(master, {
            "v": 1, "akid": akid, "role_arn": role_arn, "assumed_role_arn": assumed_arn, "session_name": name,
            "src_arn": caller["arn"], "iat": int(now), "exp": exp, "chained": caller["session"] is not None})
        rec["issued_akid"], rec["expiration"] = akid, iso(exp)
        return ('<AssumeRoleResponse xmlns="%s">\n  <AssumeRoleResult>\n    <AssumedRoleUser>\n'
                '      <AssumedRoleId>%s:%s</AssumedRoleId>\n      <Arn>%s</Arn>\n    </AssumedRoleUser>\n'
                '    <Credentials>\n      <AccessKeyId>%s</AccessKeyId>\n      <SecretAccessKey>%s</SecretAccessKey>\n'
                '      <SessionToken>%s</SessionToken>\n      <Expiration>%s</Expiration>\n    </Credentials>\n'
                '  </AssumeRoleResult>\n  <ResponseMetadata>\n    <RequestId>%s</RequestId>\n  </ResponseMetadata>\n'
                '</AssumeRoleResponse>\n'
                % (NS, role_id, escape(name), escape(assumed_arn), akid, derive_secret(master, akid), token,
                   iso(exp), rid))


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
