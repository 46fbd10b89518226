"""Cloudburst's Retwis benchmark: a Twitter clone on a Redis-like shim over the KVS.

Ported from ``droplet/server/benchmarks/retwis_benchmark.py`` in
hydro-project/cloudburst. The shim stores Redis sets with ``put(key, {x})``
and lists with ``put(key, [x])``, relying on Cloudburst's serializer turning
a set into a SetLattice and a list into an ordered set, so that additions
merge. Anna's ``ListBasedOrderedSet`` became ``droplet.lattices.OrderedSetLattice``
(``.reveal()`` for ``.lst``).

The workload is smaller (8 users, 3 follows each, all issued at once so that
adds to one set race) and deterministic, and instead of logging a
timeline, the run checks every user's followers and timeline.
"""

from __future__ import annotations

import ast
import logging
import pickle
import random
import time
import uuid
from typing import Any

from _checks import expect

from droplet.lattices import OrderedSetLattice


def run(droplet_client: Any, num_requests: int) -> list[float]:
    class DropletRedisShim:
        def __init__(self, droplet_user_library: Any) -> None:
            self._droplet = droplet_user_library

        def exists(self, key: str) -> bool:
            return self._droplet.get(key) is not None

        def get(self, key: str) -> Any:
            value = self._droplet.get(key)
            if value is None:
                return None
            return pickle.loads(value)

        def set(self, key: str, value: Any) -> None:
            self._droplet.put(key, pickle.dumps(value))

        def incr(self, key: str) -> int:
            return int(uuid.uuid4())

        def sadd(self, key: str, value: Any) -> None:
            self._droplet.put(key, {pickle.dumps(value)})

        def smembers(self, key: str) -> set[Any]:
            values = self._droplet.get(key)
            if values is None:
                return set()
            return {pickle.loads(val) for val in values}

        def scard(self, key: str) -> int:
            return len(self.smembers(key))

        def lpush(self, key: str, value: Any) -> None:
            ts = int(time.time() * 1000000)  # 16 digits for the foreseeable future
            item = ("{}:{}".format(ts, pickle.dumps(value))).encode()
            self._droplet.put(key, [item])

        def lrange(self, key: str, begin: int, end: int) -> list[Any]:
            if not self.exists(key):
                return []
            oset = OrderedSetLattice(self._droplet.get(key))
            # trim off the timestamp and delimiter, and unpickle the rest
            return [pickle.loads(ast.literal_eval(item.decode()[17:]))
                    for item in oset.reveal()[begin:end]]

        def llen(self, key: str) -> int:
            if not self.exists(key):
                return 0
            return len(list(self._droplet.get(key)))

    class Model:
        def __init__(self, r: Any, id: Any) -> None:
            self.__dict__["id"] = id
            self.__dict__["r"] = r

        def __setattr__(self, name: str, value: Any) -> None:
            if name not in self.__dict__:
                klass = self.__class__.__name__.lower()
                self.r.set("%s:id:%s:%s" % (klass, self.id, name.lower()), value)
            else:
                self.__dict__[name] = value

        def __getattr__(self, name: str) -> Any:
            if name not in self.__dict__:
                klass = self.__class__.__name__.lower()
                v = self.r.get("%s:id:%s:%s" % (klass, self.id, name.lower()))
                if v:
                    return v
                raise AttributeError("%s doesn't exist" % name)
            return self.__dict__[name]

    class User(Model):
        @staticmethod
        def find_by_user(r: Any, user: str) -> int | None:
            _id = r.get("user:user:%s" % user)
            return int(_id) if _id is not None else None

        @staticmethod
        def create(r: Any, user: str, password: str) -> None:
            user_id = user  # for idempotency
            if not r.get("user:user:%s" % user):
                r.set("user:id:%s:user" % user_id, user)
                r.set("user:user:%s" % user, user_id)
                r.set("user:id:%s:password" % user_id, password)
                r.lpush("users", user_id)

        @staticmethod
        def timeline(r: Any, user: str, page: int = 1) -> list[Any]:
            userid = User.find_by_user(r, user)
            timeline_len = r.llen("user:id:%s:timeline" % userid)
            if timeline_len > 0:
                _from, _to = timeline_len - page * 10, timeline_len - (page - 1) * 10
                timeline = r.lrange("user:id:%s:timeline" % userid, _from, _to)
                if timeline:
                    return [(int(post_id), Post(r, int(post_id)).content)
                            for post_id in timeline]
            return []

        @staticmethod
        def add_post(r: Any, userid: Any, post_id: int) -> None:
            r.lpush("user:id:%s:posts" % userid, post_id)
            r.lpush("user:id:%s:timeline" % userid, post_id)
            r.sadd("posts:id", post_id)

        @staticmethod
        def add_timeline_post(r: Any, userid: Any, post_id: int) -> None:
            r.lpush("user:id:%s:timeline" % userid, post_id)

        @staticmethod
        def follow(r: Any, user: str, target: str) -> None:
            userid = User.find_by_user(r, user)
            targetid = User.find_by_user(r, target)
            if userid == targetid:
                return
            r.sadd("user:id:%s:followees" % userid, targetid)
            User.add_follower(r, targetid, userid)

        @staticmethod
        def followers(r: Any, userid: Any) -> Any:
            return r.smembers("user:id:%s:followers" % userid) or []

        @staticmethod
        def add_follower(r: Any, userid: Any, targetid: Any) -> None:
            r.sadd("user:id:%s:followers" % userid, targetid)

    class Post(Model):
        @staticmethod
        def create(r: Any, user: str, content: str, parent_post_id: Any = None) -> None:
            userid = User.find_by_user(r, user)
            post_id = r.incr("post:uid")
            post = Post(r, post_id)
            post.user_id = userid
            post.parent = parent_post_id
            post.content = content
            User.add_post(r, userid, post_id)
            for follower in User.followers(r, userid):
                User.add_timeline_post(r, follower, post_id)

    def ccc_redis_exists(droplet: Any, key: str) -> str:
        return str(DropletRedisShim(droplet).exists(key))

    def ccc_redis_get(droplet: Any, key: str) -> str:
        return str(DropletRedisShim(droplet).get(key))

    def ccc_redis_set(droplet: Any, key: str, value: Any) -> str:
        DropletRedisShim(droplet).set(key, value)
        return "success"

    def ccc_redis_sadd(droplet: Any, key: str, value: Any) -> str:
        DropletRedisShim(droplet).sadd(key, value)
        return "success"

    def ccc_redis_smembers(droplet: Any, key: str) -> str:
        return str(DropletRedisShim(droplet).smembers(key))

    def ccc_redis_lpush(droplet: Any, key: str, value: Any) -> str:
        DropletRedisShim(droplet).lpush(key, value)
        return "success"

    def ccc_redis_lrange(droplet: Any, key: str, begin: int, end: int) -> str:
        return str(DropletRedisShim(droplet).lrange(key, begin, end))

    def ccc_redis_llen(droplet: Any, key: str) -> str:
        return str(DropletRedisShim(droplet).llen(key))

    def ccc_user_create(droplet: Any, user: str) -> str:
        User.create(DropletRedisShim(droplet), user, "password")
        return "success"

    def ccc_user_timeline(droplet: Any, user: str, page: int) -> bytes:
        return pickle.dumps(User.timeline(DropletRedisShim(droplet), user, page))

    def ccc_user_follow(droplet: Any, user: str, target: str) -> str:
        User.follow(DropletRedisShim(droplet), user, target)
        return "success"

    def ccc_post_create(droplet: Any, user: str, post: str) -> str:
        Post.create(DropletRedisShim(droplet), user, post)
        return "success"

    def ccc_reply_create(droplet: Any, user: str, post: str, parent_cid: Any) -> str:
        Post.create(DropletRedisShim(droplet), user, post, parent_cid)
        return "success"

    fns = {
        "ccc_redis_exists": ccc_redis_exists, "ccc_redis_get": ccc_redis_get,
        "ccc_redis_set": ccc_redis_set, "ccc_redis_sadd": ccc_redis_sadd,
        "ccc_redis_smembers": ccc_redis_smembers, "ccc_redis_lpush": ccc_redis_lpush,
        "ccc_redis_lrange": ccc_redis_lrange, "ccc_redis_llen": ccc_redis_llen,
        "ccc_user_create": ccc_user_create, "ccc_user_timeline": ccc_user_timeline,
        "ccc_user_follow": ccc_user_follow, "ccc_post_create": ccc_post_create,
        "ccc_reply_create": ccc_reply_create,
    }
    cfns = {fname: droplet_client.register(f, fname) for fname, f in fns.items()}
    expect(all(cfns.values()), "registration failed")

    def callfn(fname: str, *args: Any) -> Any:
        r = cfns[fname](*args).get()
        logging.info("%s(%s) -> %s", fname, args, r)
        return r

    # the Redis shim on its own (unique keys, so a second run starts clean)
    tag = uuid.uuid4().hex[:8]
    expect(callfn("ccc_redis_exists", f"foo{tag}") == "False", "a fresh key exists")
    callfn("ccc_redis_set", f"foo{tag}", b"3")
    expect(callfn("ccc_redis_get", f"foo{tag}") == "b'3'", "get after set")
    callfn("ccc_redis_sadd", f"sxt{tag}", b"4")
    callfn("ccc_redis_sadd", f"sxt{tag}", b"5")
    members = ast.literal_eval(callfn("ccc_redis_smembers", f"sxt{tag}"))
    expect(members == {b"4", b"5"}, f"sadd lost a member: {members!r}")
    for item in (b"5", b"6", b"4"):
        callfn("ccc_redis_lpush", f"lxt{tag}", item)
    expect(callfn("ccc_redis_llen", f"lxt{tag}") == "3", "lpush lost an item")
    expect(callfn("ccc_redis_lrange", f"lxt{tag}", 0, 10) == str([b"5", b"6", b"4"]),
           "lrange is not in push order")

    # the social network: users, then follows issued all at once
    rng = random.Random(int(tag, 16))
    base = rng.randrange(10**6, 10**9) * 100  # user names are numbers, as upstream's
    usernames = [str(base + i) for i in range(8)]
    for username in usernames:
        expect(callfn("ccc_user_create", username) == "success", "user creation failed")
    follows = {u: rng.sample([v for v in usernames if v != u], 3) for u in usernames}
    pending = [cfns["ccc_user_follow"](u, t) for u, targets in follows.items()
               for t in targets]
    expect(all(f.get() == "success" for f in pending), "a follow failed")
    for user in usernames:
        want = {v for v, targets in follows.items() if user in targets}
        got = ast.literal_eval(callfn("ccc_redis_smembers", f"user:id:{user}:followers"))
        expect({str(g) for g in got} == want, f"{user}'s followers {got!r} != {want!r}")

    # everyone posts once; one reply
    start = time.time()
    wtimes = []
    for username in usernames:
        t0 = time.time()
        callfn("ccc_post_create", username, f"{username} says: I love droplet!")
        wtimes.append(time.time() - t0)
    first = pickle.loads(callfn("ccc_user_timeline", usernames[0], 1))
    parent = first[-1][0]
    callfn("ccc_reply_create", usernames[1], f"{usernames[1]} says: @{parent}, agreed!", parent)

    rtimes = []
    for user in usernames:
        t0 = time.time()
        timeline = pickle.loads(callfn("ccc_user_timeline", user, 1))
        rtimes.append(time.time() - t0)
        authors = {user} | set(follows[user])
        want = {f"{a} says: I love droplet!" for a in authors}
        if usernames[1] in authors:
            want.add(f"{usernames[1]} says: @{parent}, agreed!")
        got = {content for _, content in timeline}
        expect(got == want, f"{user}'s timeline {sorted(got)} != {sorted(want)}")
    logging.info("retwis: %d ops in %.2f s", len(rtimes) + len(wtimes), time.time() - start)
    return rtimes
