#!/usr/bin/python3
"""RDS IAM token verifier of the local lab (standard library only).

Run by the lab's PAM module (pam_rdsiam.so) for every login to an IAM user:
the token arrives on stdin, the login user in $PAM_USER.  It recomputes the
SigV4 query signature on its own (it shares no code with the proxy's signer,
so one bug cannot hide on both sides) and checks everything RDS checks:
Action, DBUser, endpoint, service, region, expiry and clock skew, the key and
its session token.  One JSON line per attempt goes to the verifier log; the
token itself and secrets are never logged.  Exit 0 = accept, 1 = refuse,
2 = internal error (also a refusal).

Manual use:
  verifier.py --conf DIR/lab.json --engine postgres --user bytebase < token.txt
  verifier.py --selftest          # the published botocore vector
"""
import argparse
import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import struct
import sys
import time

UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
RAW_OK = re.compile(r"^[A-Za-z0-9\-_.~%]*$")
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
MAX_EXPIRES = 900
MAX_FUTURE_SKEW = 300
TOKEN_MAGIC = b"LABSTS1\x00"
REQUIRED = ("Action", "DBUser", "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date",
            "X-Amz-Expires", "X-Amz-SignedHeaders", "X-Amz-Signature")


class Refused(Exception):
    pass


def uri_encode(s):
    """RFC 3986 encoding as SigV4 wants it: all but A-Za-z0-9-_.~ as %XX (upper hex)."""
    return "".join(chr(b) if b in UNRESERVED else "%%%02X" % b for b in s.encode("utf-8"))


def pct_decode(s, what):
    out = bytearray()
    i = 0
    raw = s.encode("ascii")
    while i < len(raw):
        c = raw[i]
        if c == 0x25:  # '%'
            h = raw[i + 1:i + 3]
            if len(h) != 2 or not re.fullmatch(rb"[0-9A-Fa-f]{2}", h):
                raise Refused("malformed percent-encoding in %s" % what)
            out.append(int(h, 16))
            i += 3
        else:
            out.append(c)
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("%s is not UTF-8 after decoding" % what)


def derive_secret(master, akid):
    """Lab rule shared (by specification, not by code) with sts.py."""
    mac = hmac.new(master, b"secret:" + akid.encode("ascii"), hashlib.sha256).digest()
    return base64.b64encode(mac).decode("ascii")[:40]


def decode_session_token(master, token):
    """Return the payload dict of a lab session token, or raise Refused."""
    try:
        blob = base64.b64decode(token.encode("ascii"), validate=True)
    except Exception:
        raise Refused("X-Amz-Security-Token is not a lab session token (not base64)")
    if len(blob) < len(TOKEN_MAGIC) + 2 + 32 or not blob.startswith(TOKEN_MAGIC):
        raise Refused("X-Amz-Security-Token is not a lab session token")
    body, mac = blob[:-32], blob[-32:]
    want = hmac.new(master, b"lab-session-token\x00" + body, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, want):
        raise Refused("X-Amz-Security-Token is forged or altered (bad MAC)")
    (n,) = struct.unpack(">H", body[len(TOKEN_MAGIC):len(TOKEN_MAGIC) + 2])
    payload = body[len(TOKEN_MAGIC) + 2:len(TOKEN_MAGIC) + 2 + n]
    try:
        return json.loads(payload)
    except ValueError:
        raise Refused("X-Amz-Security-Token payload unreadable")


def parse_token(token):
    """Split HOST:PORT/?query into (hostport, [(key, value, raw_key, raw_value)])."""
    if not token:
        raise Refused("empty password")
    if "://" in token:
        raise Refused("token must not carry a URL scheme")
    if any(c.isspace() for c in token) or "#" in token:
        raise Refused("token contains whitespace or '#'")
    hostport, sep, query = token.partition("/?")
    if not sep:
        raise Refused("token is not HOST:PORT/?QUERY")
    if "/" in hostport or "?" in hostport or "@" in hostport:
        raise Refused("malformed host part")
    host, colon, port = hostport.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Refused("host part must be HOST:PORT")
    params = []
    seen = set()
    for part in query.split("&"):
        k, eq, v = part.partition("=")
        if not eq or not k:
            raise Refused("malformed query component")
        if not RAW_OK.match(k) or not RAW_OK.match(v):
            bad = next(c for c in k + v if not RAW_OK.match(c))
            raise Refused("query not fully percent-encoded (raw %r in parameter %s)" % (bad, k[:40]))
        dk, dv = pct_decode(k, "query key"), pct_decode(v, "value of " + k[:40])
        if dk in seen:
            raise Refused("duplicate query parameter %s" % dk)
        seen.add(dk)
        params.append((dk, dv))
    return hostport, params


def signature(secret, hostport, params, amz_date, scope):
    """Recompute the SigV4 query signature (presigned GET /, signed header host)."""
    canon_q = "&".join("%s=%s" % kv for kv in sorted(
        (uri_encode(k), uri_encode(v)) for k, v in params if k != "X-Amz-Signature"))
    canonical = "\n".join(["GET", "/", canon_q, "host:" + hostport.lower(), "", "host", EMPTY_SHA256])
    sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                     hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
    date, region, service, term = scope.split("/")
    k = hmac.new(("AWS4" + secret).encode("utf-8"), date.encode(), hashlib.sha256).digest()
    for part in (region, service, term):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    return hmac.new(k, sts.encode("utf-8"), hashlib.sha256).hexdigest()


def verify(token, user, conf, engine, master, now, info):
    """Raise Refused(reason) unless the token is good; fill info for the log."""
    hostport, plist = parse_token(token)
    info["endpoint"] = hostport
    p = dict(plist)
    missing = [k for k in REQUIRED if k not in p]
    if missing:
        raise Refused("missing query parameter(s): " + ", ".join(missing))
    cred = p["X-Amz-Credential"].split("/")
    if len(cred) == 5:
        info["akid"], info["region"] = cred[0], cred[2]
    if p["Action"] != "connect":
        raise Refused("Action=%s, want connect" % p["Action"][:40])
    if p["DBUser"] != user:
        raise Refused("DBUser %r does not match login user %r" % (p["DBUser"][:64], user))
    endpoints = [e.lower() for e in conf[engine]["endpoints"]]
    if hostport.lower() not in endpoints:
        raise Refused("signed for endpoint %s, not one of %s" % (hostport, ", ".join(endpoints)))
    if p["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
        raise Refused("X-Amz-Algorithm %s unsupported" % p["X-Amz-Algorithm"][:40])
    if len(cred) != 5 or cred[4] != "aws4_request":
        raise Refused("malformed X-Amz-Credential")
    akid, cdate, region, service, _ = cred
    if service != "rds-db":
        raise Refused("credential scope service %s, want rds-db" % service[:40])
    if region != conf["region"]:
        raise Refused("credential scope region %s, lab region is %s" % (region[:40], conf["region"]))
    if p["X-Amz-SignedHeaders"] != "host":
        raise Refused("X-Amz-SignedHeaders=%s, want host" % p["X-Amz-SignedHeaders"][:60])
    amz_date = p["X-Amz-Date"]
    if not re.fullmatch(r"\d{8}T\d{6}Z", amz_date):
        raise Refused("malformed X-Amz-Date")
    try:
        signed = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        raise Refused("malformed X-Amz-Date")
    info["signed_at"] = amz_date
    if cdate != amz_date[:8]:
        raise Refused("credential scope date %s differs from X-Amz-Date" % cdate[:20])
    if not re.fullmatch(r"[1-9][0-9]{0,5}", p["X-Amz-Expires"]):
        raise Refused("malformed X-Amz-Expires")
    expires = int(p["X-Amz-Expires"])
    if expires > MAX_EXPIRES:
        raise Refused("X-Amz-Expires %d > %d" % (expires, MAX_EXPIRES))
    if signed - now > MAX_FUTURE_SKEW:
        raise Refused("X-Amz-Date is %d s in the future (max %d)" % (signed - now, MAX_FUTURE_SKEW))
    if now > signed + expires:
        raise Refused("token expired: signed %s, valid %d s, expired %d s ago"
                      % (amz_date, expires, now - signed - expires))
    sess = p.get("X-Amz-Security-Token")
    if akid == conf["base"]["access_key_id"]:
        if sess is not None:
            raise Refused("X-Amz-Security-Token present with long-term key %s" % akid)
    elif re.fullmatch(r"ASIA[A-Z0-9]{16}", akid):
        if sess is None:
            raise Refused("temporary key %s without X-Amz-Security-Token" % akid)
        st = decode_session_token(master, sess)
        info["session_name"] = st.get("session_name")
        info["role_arn"] = st.get("role_arn")
        if st.get("akid") != akid:
            raise Refused("session token belongs to %s, not %s" % (st.get("akid"), akid))
        if now >= st["exp"]:
            raise Refused("temporary credentials %s expired at %s (%d s ago)" % (
                akid, dt.datetime.fromtimestamp(st["exp"], dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                now - st["exp"]))
    else:
        raise Refused("unknown access key id %s" % akid[:32])
    want = signature(derive_secret(master, akid), hostport, plist, amz_date, "/".join(cred[1:]))
    if not hmac.compare_digest(want.encode(), p["X-Amz-Signature"].encode("ascii")):
        raise Refused("signature does not match")


def log_line(path, rec):
    line = (json.dumps(rec, sort_keys=False) + "\n").encode("utf-8")
    old = os.umask(0)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    finally:
        os.umask(old)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def selftest():
    """Published vector (botocore generate_db_auth_token)."""
    token = ("mydb.c1fycpveg7nf.us-west-2.rds.amazonaws.com:3306/?Action=connect&DBUser=mysqluser"
             "&X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAKIAKIAKIAKIAKIAK%2F20180722%2Feu-west-1%2Frds-db%2Faws4_request"
             "&X-Amz-Date=20180722T202236Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host")
    hostport, plist = parse_token(token)
    got = signature("1" * 40, hostport, plist, "20180722T202236Z",
                    "20180722/eu-west-1/rds-db/aws4_request")
    want = "b77c366f1379046852039d21f733035fa73696275c03dd2908ef267c3049d831"
    print("selftest", "ok" if got == want else "FAILED got " + got)
    return 0 if got == want else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conf")
    ap.add_argument("--engine", choices=["postgres", "mysql"])
    ap.add_argument("--user", help="login user (default: $PAM_USER)")
    ap.add_argument("--selftest", action="store_true")
    a = ap.parse_args()
    if a.selftest:
        return selftest()
    if not a.conf or not a.engine:
        ap.error("--conf and --engine are required")
    t0 = time.time()
    raw = sys.stdin.buffer.read(1 << 20)
    user = a.user if a.user is not None else os.environ.get("PAM_USER", "")
    info = {"endpoint": None, "region": None, "akid": None, "session_name": None}
    conf = None
    ok, reason, code = False, "", 1
    try:
        with open(a.conf) as f:
            conf = json.load(f)
        with open(conf["master_secret_file"], "rb") as f:
            master = f.read().strip()
        try:
            token = raw.decode("ascii")
        except UnicodeDecodeError:
            raise Refused("token is not ASCII")
        verify(token, user, conf, a.engine, master, time.time(), info)
        ok, reason, code = True, "ok", 0
    except Refused as e:
        reason = str(e)
    except Exception as e:  # config or programming error: refuse, say why
        reason, code = "verifier error: %s: %s" % (type(e).__name__, e), 2
    rec = {
        "ts": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "engine": a.engine, "user": user, "endpoint": info["endpoint"], "region": info["region"],
        "akid": info["akid"], "session_name": info["session_name"],
        "token_sha256": hashlib.sha256(raw).hexdigest(), "token_bytes": len(raw),
        "ok": ok, "reason": reason,
        "signed_at": info.get("signed_at"), "role_arn": info.get("role_arn"),
        "pam_service": os.environ.get("PAM_SERVICE"), "rhost": os.environ.get("PAM_RHOST"),
        "ms": round((time.time() - t0) * 1000, 1),
    }
    try:
        log_line(conf["verifier"]["log"] if conf else "/dev/stderr", rec)
    except Exception as e:
        sys.stderr.write("verifier: cannot write log: %s\n" % e)
    if not ok:
        sys.stderr.write("verifier: refused user=%s: %s\n" % (user, reason))
    return code


if __name__ == "__main__":
    sys.exit(main())
