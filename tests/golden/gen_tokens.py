#!/usr/bin/env python3
"""Regenerate tokens.json: RDS IAM tokens from botocore's generate_db_auth_token.

These are the reference our signer (src/aws/token.rs) must equal byte for byte.
Needs botocore (pip install botocore). Usage: python3 gen_tokens.py > tokens.json
"""
import datetime
import json
from unittest import mock

import botocore.session

SESSION_TOKEN = (
    "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQD+lab/token+with/slashes=="
    + "A" * 300
)
CASES = [
    # name, key, secret, session token, region, host, port, user, time
    ("published", "AKIAKIAKIAKIAKIAKIAK", "1" * 40, None, "eu-west-1",
     "mydb.c1fycpveg7nf.us-west-2.rds.amazonaws.com", 3306, "mysqluser", "2018-07-22T20:22:36"),
    ("session-token-5432", "ASIAEXAMPLEEXAMPLE01", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", SESSION_TOKEN,
     "us-east-1", "orders.abc123.us-east-1.rds.amazonaws.com", 5432, "bytebase", "2026-12-04T10:00:00"),
    ("session-token-3306", "ASIAEXAMPLEEXAMPLE02", "secret/with+plus=", SESSION_TOKEN,
     "eu-central-1", "shop.cluster-xyz.eu-central-1.rds.amazonaws.com", 3306, "app_user", "2026-01-31T23:59:59"),
    ("user-plus", "AKIAEXAMPLEEXAMPLE03", "s" * 40, None, "us-west-2",
     "db.x.us-west-2.rds.amazonaws.com", 5432, "a+b", "2026-06-01T00:00:00"),
    ("user-at", "AKIAEXAMPLEEXAMPLE04", "t" * 40, None, "us-west-2",
     "db.x.us-west-2.rds.amazonaws.com", 5432, "dev@corp.example", "2026-06-01T00:00:00"),
    ("user-space", "AKIAEXAMPLEEXAMPLE05", "u" * 40, None, "us-west-2",
     "db.x.us-west-2.rds.amazonaws.com", 3306, "two words", "2026-06-01T00:00:00"),
    ("user-non-ascii", "ASIAEXAMPLEEXAMPLE06", "v" * 40, "short/token+=", "ap-northeast-1",
     "db.x.ap-northeast-1.rds.amazonaws.com", 5432, "ユーザー_é~x", "2026-06-01T12:34:56"),
    ("user-reserved", "AKIAEXAMPLEEXAMPLE07", "w" * 40, None, "us-east-2",
     "db.x.us-east-2.rds.amazonaws.com", 5432, "a/b?c&d=e%f", "2026-02-28T08:00:00"),
]


def main():
    out = []
    session = botocore.session.get_session()
    for name, key, secret, token, region, host, port, user, when in CASES:
        client = session.create_client(
            "rds", region_name=region, aws_access_key_id=key,
            aws_secret_access_key=secret, aws_session_token=token)
        t = datetime.datetime.fromisoformat(when)
        with mock.patch("botocore.auth.get_current_datetime", return_value=t):
            got = client.generate_db_auth_token(host, port, user)
        out.append(dict(name=name, access_key_id=key, secret_access_key=secret,
                        session_token=token, region=region, host=host, port=port,
                        user=user, time=when + "Z", token=got))
    print(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
