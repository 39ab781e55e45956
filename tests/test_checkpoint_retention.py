"""Retention as a property: random save / crash / restart / restore sequences against a reference model.

After every step the folder and the vault must hold exactly the checkpoints the rules
keep (keep-last, keep-best, keep-every-N, plus the newest verified one and the one this
process resumed from), a crash must never cost a complete checkpoint, and a fresh
machine must restore the newest committed one from the vault (after pruning too).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import liferaft
from conftest import machine
from liferaft.checkpoint import select_keep
from liferaft.checkpoint.folder import MANIFEST, Naming, write_checkpoint
from liferaft.checkpoint.retention import Policy
from liferaft.checkpoint.state import StagingPool, stage
from liferaft.errors import LiferaftError, VaultNotFound

np = pytest.importorskip("numpy")

DEAD_PID = 4_194_399  # above any Linux pid_max: never a live process
RUN = "prop"

metric = st.one_of(st.none(), st.sampled_from([0.1, 0.5, 0.5, 0.9, 2.0]))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("save"), st.integers(1, 3), metric),
        st.tuples(st.just("crash_mid_write"), st.just(1), st.none()),
        st.tuples(st.just("crash_before_commit"), st.integers(1, 2), metric),
        st.tuples(st.just("restart"), st.just(0), st.none()),
        st.tuples(st.just("restore"), st.just(0), st.none()),
        st.tuples(st.just("restore_best"), st.just(0), st.none()),
    ),
    min_size=1,
    max_size=12,
)
policies = st.builds(
    dict,
    keep_last=st.one_of(st.none(), st.integers(1, 3)),
    keep_best=st.integers(0, 2),
    keep_every=st.one_of(st.none(), st.integers(2, 4)),
)


def state_of(step: int) -> dict:
    return {"w": np.full(16, step, dtype=np.float32), "step": step}


def reference_keep(existing: dict[int, float | None], policy: dict, protect: set[int]) -> set[int]:
    """The rules, written out plainly (independent of liferaft's select_keep)."""
    steps = sorted(existing)
    keep = {s for s in protect if s in existing}
    keep |= set(steps) if policy["keep_last"] is None else set(steps[-policy["keep_last"] :])
    ranked = sorted((s for s in steps if existing[s] is not None), key=lambda s: (existing[s], -s))
    keep |= set(ranked[: policy["keep_best"]])
    if policy["keep_every"]:
        keep |= {s for s in steps if s % policy["keep_every"] == 0}
    return keep


def vault_steps(vault: liferaft.Vault) -> list[int]:
    try:
        vault.repository()
    except VaultNotFound:
        return []  # nothing committed yet
    return sorted(s.step for s in vault.snapshots(run=RUN) if s.tags.get("liferaft.kind") == "checkpoint")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies, sequence=ops)
def test_retention_over_random_save_crash_restore_sequences(policy: dict, sequence: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "m1" / "checkpoints"
        vault_url = str(root / "vault")

        def new() -> liferaft.Checkpointer:
            with machine(root / "m1"):
                return liferaft.Checkpointer("checkpoints", run=RUN, vault=vault_url, monitor="m", mode="min", **policy)

        existing: dict[int, float | None] = {}
        uncommitted: set[int] = set()
        resumed: int | None = None
        newest_good: int | None = None
        step = 0
        ck = new()
        for kind, inc, m in sequence:
            if kind == "save":
                step += inc
                ck.save(step, state_of(step), metrics=None if m is None else {"m": m})
                ck.wait()
                uncommitted.clear()  # the process's first save commits what a crash left behind
                existing[step] = m
                newest_good = step
                protect = {s for s in (resumed, newest_good) if s is not None}
                existing = {s: existing[s] for s in reference_keep(existing, policy, protect)}
            elif kind == "crash_mid_write":
                ck.close()
                junk = folder / ".liferaft" / f"tmp-{DEAD_PID}-dead-step-{step + 1}"
                junk.mkdir(parents=True)
                (junk / "tensors.safetensors").write_bytes(b"\0" * 100)  # half written, then the kill
                ck, resumed, newest_good = new(), None, None
                assert not junk.exists()
            elif kind == "crash_before_commit":
                ck.close()
                step += inc
                metrics = {} if m is None else {"m": m}
                write_checkpoint(Naming(folder, "step-"), RUN, step, metrics, stage(state_of(step), StagingPool()))
                existing[step] = m
                uncommitted.add(step)
                ck, resumed, newest_good = new(), None, None
            elif kind == "restart":
                ck.close()
                ck, resumed, newest_good = new(), None, None
            elif kind == "restore":
                r = ck.restore()
                if not existing:
                    assert r is None
                else:
                    assert r is not None and r.step == max(existing) and r.state["step"] == r.step
                    assert float(r.state["w"][3]) == r.step
                    resumed = r.step
                    newest_good = r.step if newest_good is None else max(newest_good, r.step)
            elif kind == "restore_best":
                scored = sorted((v, -s, s) for s, v in existing.items() if v is not None)
                if not existing:
                    assert ck.restore(best=True) is None
                elif not scored:
                    with pytest.raises(LiferaftError, match="has the metric"):
                        ck.restore(best=True)
                else:
                    r = ck.restore(best=True)
                    assert r is not None and r.step == scored[0][2] and r.state["step"] == r.step
                    resumed = r.step
                    newest_good = r.step if newest_good is None else max(newest_good, r.step)
            # The folder and the vault hold exactly what the rules keep.
            local = sorted(int(p.name[5:]) for p in folder.glob("step-*") if (p / MANIFEST).exists())
            assert local == sorted(existing), (kind, policy)
            assert vault_steps(ck.vault) == sorted(set(existing) - uncommitted), (kind, policy)
        ck.close()
        committed = set(existing) - uncommitted
        with machine(root / "m2"):
            fresh = liferaft.Checkpointer("checkpoints", run=RUN, vault=vault_url, monitor="m")
        r = fresh.restore()
        if committed:
            assert r is not None and r.step == max(committed) and float(r.state["w"][0]) == r.step
        else:
            assert r is None
        fresh.close()


@given(
    steps=st.sets(st.integers(0, 60), max_size=12),
    scores=st.dictionaries(st.integers(0, 60), st.floats(-5, 5, allow_nan=False), max_size=12),
    policy=policies,
    protect=st.sets(st.integers(0, 60), max_size=3),
)
def test_select_keep_matches_the_rules(steps: set[int], scores: dict, policy: dict, protect: set[int]) -> None:
    p = Policy(monitor="m" if policy["keep_best"] else None, **policy)
    keep = select_keep(steps, {s: {"m": v} for s, v in scores.items()}, p, protect)
    existing = {s: scores.get(s) for s in steps}
    assert keep == reference_keep(existing, policy, protect)
    assert keep <= steps
    if steps:
        assert max(steps) in keep  # the newest always stays
