#!/usr/bin/env python3
"""Black-box proofs of the identity attacks fixed in 2026-12 (a security
review's findings 1, 2, 6, 12 and 15: reset codes guessed by brute force, a
permanent lockout, a stream that outlives logout, a retried refresh that
ends the session, unlimited guesses at account deletion; docs/SECURITY.md
says what each defence is), run against a local `./dev cluster`.

Each proof tries the attack as the review describes it and prints what it
got. Against the code the review read, every attack succeeded; each line
that ends in "REFUSED" says the attack now fails. Exits 1 if any attack
still succeeds.

    ./dev cluster &            # wait for "router on http://127.0.0.1:8080"
    # finding 2 waits out the lock: make it short
    HOMECELL_PKI_DIR=.homecell/pki target/release/control-plane \
        config set auth.lockout.duration 5s
    python3 harness/blackbox/identity_review.py [http://127.0.0.1:8080]

Only the standard library; it talks to the given router alone, with bounded
loops (a few hundred requests in all).
"""

import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

BASE = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
PW = "correct horse battery"
failed = []


def call(method, path, body=None, token=None, timeout=30, patient=True):
    """One request. Every request here comes from one address: a refusal
    for the address's own limit (not what a proof measures) is waited out
    and retried, at most three times."""
    for _ in range(3):
        got = once(method, path, body, token, timeout)
        detail = got[1].get("detail", "") if isinstance(got[1], dict) else ""
        if not (patient and got[0] == 429 and "from this address" in detail):
            return got
        time.sleep(int(got[2].get("Retry-After", got[2].get("retry-after", "60"))) + 1)
    return got


def once(method, path, body, token, timeout):
    req = urllib.request.Request(BASE + path, method=method)
    req.add_header("x-client-type", "app")
    if token:
        req.add_header("authorization", "Bearer " + token)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, data, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None), dict(r.headers)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        return e.code, body, dict(e.headers)


def verdict(name, refused, detail):
    print(f"{name}: {detail} -> {'REFUSED' if refused else 'STILL WORKS'}")
    if not refused:
        failed.append(name)


def user(tag):
    who = f"{tag}-{uuid.uuid4().hex[:8]}@review.test"
    s, b, _ = call("POST", "/v1/auth/register", {"identifier": who, "password": PW})
    assert s == 201, (s, b)
    return who


def login(who, pw=PW):
    return call("POST", "/v1/auth/login", {"identifier": who, "password": pw})


def finding_1(who):
    """Reset codes: request a code, guess 5 times, repeat; count refusals."""
    statuses = []
    for _ in range(8):
        statuses.append(call("POST", "/v1/auth/password/reset", {"identifier": who})[0])
        for _ in range(5):
            code = f"{random.randrange(10**6):06d}"
            statuses.append(
                call("PUT", "/v1/auth/password/reset",
                     {"identifier": who, "code": code, "new_password": "attacker pw 1"})[0]
            )
    guesses_answered = sum(1 for s in statuses if s == 400)
    refused = statuses.count(429)
    verdict("finding 1 (reset brute force)", refused > 0 and guesses_answered <= 10,
            f"{len(statuses)} requests, {guesses_answered} guesses compared, {refused} refused with 429")


def finding_2(who):
    """Lockout trap: 4 wrong logins, a 5th while argon2 is saturated by a
    registration flood, then the right password after the flood."""
    for _ in range(4):
        login(who, "wrong password")
    results = []

    def flood(i):
        results.append(call("POST", "/v1/auth/register",
                            {"identifier": f"flood{i}-{uuid.uuid4().hex[:6]}", "password": PW},
                            patient=False)[0])

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    fifth = login(who, "wrong password")[0]
    for t in threads:
        t.join()
    # Past the lock time (auth.lockout.duration 5s), whatever the 5th got.
    time.sleep(6)
    right = login(who, PW)[0]
    verdict("finding 2 (permanent lockout)", right == 200,
            f"flood answers {sorted(set(results))} ({results.count(429)} refused), "
            f"5th login {fifth}, right password after the lock time {right}")


def finding_6(who):
    """SSE stream after logout: open, log out, see whether it ends."""
    token = login(who)[1]["access_token"]
    req = urllib.request.Request(BASE + "/v1/notices/stream")
    req.add_header("authorization", "Bearer " + token)
    req.add_header("x-client-type", "app")
    stream = urllib.request.urlopen(req, timeout=60)
    ended = {}

    def read():
        try:
            while stream.read(1):
                pass
        except Exception:  # a reset also ends it
            pass
        ended["at"] = time.monotonic()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    time.sleep(0.5)
    out = time.monotonic()
    call("POST", "/v1/auth/logout", {}, token=token)
    t.join(15)
    took = ended.get("at", float("inf")) - out
    verdict("finding 6 (stream outlives logout)", took <= 5,
            "stream still open 15 s after logout" if took == float("inf")
            else f"stream ended {took:.1f} s after logout")


def finding_12(who):
    """Lost refresh answer: refresh, drop the answer, retry with the same token."""
    refresh = login(who)[1]["refresh_token"]
    call("POST", "/v1/auth/refresh", {"refresh_token": refresh})  # the answer "lost"
    s, b, _ = call("POST", "/v1/auth/refresh", {"refresh_token": refresh})
    alive = s == 200 and call("GET", "/v1/users/me", token=b["access_token"])[0] == 200
    verdict("finding 12 (retry ends the session)", alive,
            f"retry answered {s}, session {'alive' if alive else 'ended'}")


def finding_15(who):
    """DELETE /v1/users/me with wrong passwords: no lockout, no 429?"""
    token = login(who)[1]["access_token"]
    statuses = [call("DELETE", "/v1/users/me", {"password": f"guess {i:04d}"}, token=token)[0]
                for i in range(20)]
    right = call("DELETE", "/v1/users/me", {"password": PW}, token=token)[0]
    still = call("GET", "/v1/users/me", token=token)[0]
    verdict("finding 15 (deletion guesses unlimited)", right == 401 and still == 200,
            f"20 wrong guesses {sorted(set(statuses))}, then the right password {right} "
            f"(locked), account still there: {still == 200}")


# The victims first: finding 2's flood spends this address's registrations.
proofs = [(f, user(f.__name__)) for f in (finding_1, finding_6, finding_12, finding_15, finding_2)]
for f, who in proofs:
    f(who)
sys.exit(1 if failed else 0)
