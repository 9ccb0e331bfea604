"""Which replica next, when a replica is down, how long to back off, when to give up.

Sans-IO: no sockets, no clocks of its own (every call takes `now`), no event loop. The blocking
decode path (blocking.py) and the asyncio client (aio.py) both drive the same objects, so
timeouts, retries and failover are implemented once:

    attempt = shard.policy.attempt(deadline)
    while True:
        step = attempt.next(now())
        if step.replica is not None: ...try it within step.budget...; attempt.failed(rep, why, now())
        elif step.wait: sleep(step.wait)
        else: raise ShardError(step.reason)

Rules (docs/PROTOCOL.md, "Client behaviour"):
- replicas that are up share the load: the least busy one, round-robin among equals;
- a replica that failed is down for a backoff that doubles with each consecutive failure
  (BACKOFF_FIRST .. BACKOFF_MAX); while another replica is up, a down one is only probed in
  the background (`due_probes`), so the decode path never waits on a replica that may be gone;
- when no replica is up, the request itself retries them as their backoff expires, until its
  deadline: a single replica that restarts on the same address is reconnected in time;
- an attempt that could fail over to another replica gives the current one half of what is
  left of the deadline, so a hung (SIGSTOPped) replica still leaves time for the failover.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..shardmap import Endpoint

BACKOFF_FIRST = 0.05     # s: a restart on the same address is usually back within a few of these
BACKOFF_MAX = 2.0        # s: the longest a down replica waits between reconnection attempts
PROBE_INTERVAL = 1.0     # s: how often a down replica is probed while another one is up


@dataclass
class ReplicaState:
    endpoint: Endpoint
    down_until: float = 0.0         # monotonic time before which the replica is not tried
    failures: int = 0               # consecutive failures (0 = up)
    inflight: int = 0               # requests sent and not yet answered
    probing: bool = False           # a background probe is running
    last_error: str = ""

    @property
    def where(self) -> str:
        return self.endpoint.where

    def up(self) -> bool:
        return self.failures == 0


@dataclass
class Step:
    """What to do next: try `replica` within `budget` seconds, or wait `wait` seconds, or give
    up with `reason` (replica None, wait 0)."""

    replica: ReplicaState | None = None
    budget: float = 0.0
    wait: float = 0.0
    reason: str = ""


class ShardPolicy:
    """The replicas of one shard and their health."""

    def __init__(self, label: str, endpoints: list[Endpoint], *, backoff_first: float = BACKOFF_FIRST,
                 backoff_max: float = BACKOFF_MAX, probe_interval: float = PROBE_INTERVAL) -> None:
        self.label = label
        self.replicas = [ReplicaState(e) for e in endpoints]
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self.probe_interval = probe_interval
        self._turn = 0

    def choose(self, now: float, exclude: tuple[ReplicaState, ...] | list = ()) -> ReplicaState | None:
        """The replica a new request goes to: the least busy of those up (round-robin among
        equals); if none is up, the one whose backoff has expired the longest; else None."""
        n = len(self.replicas)
        if n == 1:     # the common case, without the lists below
            r = self.replicas[0]
            if r in exclude:
                return None
            return r if r.up() or (r.down_until <= now and not r.probing) else None
        order = [self.replicas[(self._turn + i) % n] for i in range(n)]
        self._turn = (self._turn + 1) % n
        up = [r for r in order if r.up() and r not in exclude]
        if up:
            return min(up, key=lambda r: r.inflight)
        ready = [r for r in order if r not in exclude and r.down_until <= now and not r.probing]
        return min(ready, key=lambda r: r.down_until) if ready else None

    def failed(self, rep: ReplicaState, error: str, now: float) -> None:
        rep.failures += 1
        rep.last_error = error
        rep.down_until = now + min(self.backoff_max, self.backoff_first * 2 ** (rep.failures - 1))

    def succeeded(self, rep: ReplicaState) -> None:
        rep.failures = 0
        rep.down_until = 0.0
        rep.last_error = ""

    def any_up(self) -> bool:
        return any(r.up() for r in self.replicas)

    def due_probes(self, now: float) -> list[ReplicaState]:
        """Down replicas to probe in the background now (only while another replica is up:
        otherwise requests retry them themselves). Marks them as probing."""
        if not self.any_up():
            return []
        due = [r for r in self.replicas if not r.up() and not r.probing
               and now >= max(r.down_until, 0.0)]
        for r in due:
            r.probing = True
        return due

    def probe_done(self, rep: ReplicaState, error: str | None, now: float) -> None:
        rep.probing = False
        if error is None:
            self.succeeded(rep)
        else:
            rep.failures += 1
            rep.last_error = error
            rep.down_until = now + max(self.probe_interval, min(self.backoff_max, self.backoff_first
                                                                * 2 ** (rep.failures - 1)))

    def attempt(self, deadline: float, *, wait: bool = True) -> Attempt:
        """One request's walk over the replicas. `wait=False` gives up instead of waiting for
        a backoff to expire (--on-shard-failure renormalize: degrade now, probe later)."""
        return Attempt(self, deadline, wait)

    def summary(self) -> str:
        """Each replica's address and last error, for the give-up message."""
        def one(r: ReplicaState) -> str:
            return r.last_error if r.where in r.last_error else f"{r.where}: {r.last_error or 'not tried'}"

        return "; ".join(one(r) for r in self.replicas)


@dataclass
class Attempt:
    policy: ShardPolicy
    deadline: float
    wait: bool = True
    tried: list[ReplicaState] = field(default_factory=list)
    tries: int = 0
    corrupt: list[ReplicaState] = field(default_factory=list)   # answered unusable data: not retried

    def next(self, now: float) -> Step:
        left = self.deadline - now
        pol = self.policy
        if left <= 0:
            return Step(reason=self._give_up("the deadline passed"))
        if len(self.corrupt) == len(pol.replicas):
            return Step(reason=self._give_up("every replica answered unusable data"))
        rep = pol.choose(now, exclude=self.tried)
        if rep is None and len(self.tried) >= len(pol.replicas):
            # every replica failed once: go round again after backoff (a replica that answered
            # corrupt data is not asked again: reconnecting does not fix a broken shard)
            self.tried = list(self.corrupt)
            rep = pol.choose(now, exclude=self.tried)
        if rep is not None:
            self.tried.append(rep)
            self.tries += 1
            others = [r for r in pol.replicas if r is not rep and r not in self.tried]
            budget = left / 2 if others else left
            return Step(replica=rep, budget=budget)
        if not self.wait:
            return Step(reason=self._give_up("no replica is up"))
        soonest = min((r.down_until for r in pol.replicas if not r.probing), default=now + pol.backoff_max)
        if soonest >= self.deadline:
            return Step(reason=self._give_up("no replica came back before the deadline"))
        return Step(wait=max(0.001, soonest - now))

    def failed(self, rep: ReplicaState, error: str, now: float, corrupt: bool = False) -> None:
        self.policy.failed(rep, error, now)
        if corrupt and rep not in self.corrupt:
            self.corrupt.append(rep)

    def _give_up(self, why: str) -> str:
        pol = self.policy
        return (f"shard {pol.label}: no answer ({why}; {pol.summary()}); "
                f"refusing to continue without experts {pol.label}")


class Replica:
    """One replica as a driver holds it: its policy state and its live connection (an asyncio
    `Connection` or a `BlockingConnection`, whichever driver owns it; None while down)."""

    def __init__(self, state: ReplicaState) -> None:
        self.state = state
        self.conn = None

    @property
    def where(self) -> str:
        return self.state.where


class Shard:
    """One shard-map entry as a driver holds it: its policy and its replicas, in policy order."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.policy = ShardPolicy(spec.label, list(spec.replicas))
        self.replicas = [Replica(s) for s in self.policy.replicas]
        self._by_state = {id(r.state): r for r in self.replicas}

    def replica(self, state: ReplicaState) -> Replica:
        return self._by_state[id(state)]
