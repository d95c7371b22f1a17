"""A policy that renames or removes a phase the warehouse's history uses is refused, with one
line, by every command that would act on it: re-run under such a policy, the phase's stored
events were measured but never judged, its verdicts and incident deleted without a word, and
`rollout flags` crashed on a flag store at a phase the policy no longer has (found by an
independent audit)."""

from __future__ import annotations

from datetime import timedelta

from rollout_assets.home import PROJECT_ROOT
from rollout_assets_tests.conftest import write_canary
from rollout_assets_tests.reliability_helpers import (
    T0,
    promote_to,
    query,
    rollout,
    window_events,
)

W = timedelta(minutes=15)


def test_a_phase_with_history_cannot_be_renamed(home):
    (home.root / "governance").mkdir()
    text = (PROJECT_ROOT / "governance" / "policy.yaml").read_text()
    (home.root / "governance" / "policy.yaml").write_text(text)
    promote_to(home, "A-1")
    write_canary(home, "A-1", window_events("A-1", T0, "w0", failed_restores=3))
    frm, to = f"{T0:%Y-%m-%dT%H:%MZ}", f"{T0 + W:%Y-%m-%dT%H:%MZ}"
    assert rollout(home, "run", "--from", frm, "--to", to).returncode == 0
    before = query(home, "select phase, breach from window_verdicts")
    assert before == [("A-1", True)] and query(home, "select count(*) from incidents") == [(1,)]

    renamed = text.replace("  - name: A-1\n", "  - name: A-9\n").replace(
        "phases: [A-1]", "phases: [A-9]")
    (home.root / "governance" / "policy.yaml").write_text(renamed)
    for argv in (("run", "--from", frm, "--to", to), ("flags", "show"),
                 ("flags", "promote", "--phase", "A-2")):
        res = rollout(home, *argv)
        assert res.returncode == 2, (argv, res.stdout, res.stderr)
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr + res.stdout
        assert "the policy has no phase 'A-1' (1 row of window_verdicts, 1 row of incidents, " \
               "1 row of window_metrics), which the warehouse's history uses" in res.stderr
    assert query(home, "select phase, breach from window_verdicts") == before  # untouched
    assert query(home, "select count(*) from incidents") == [(1,)]

    # the flag store at a phase that is gone is named too
    (home.root / "governance" / "policy.yaml").write_text(text.replace(
        "  - name: A-0\n", "  - name: A-8\n").replace("phase: A-0", "phase: A-8"))
    res = rollout(home, "flags", "show")
    assert res.returncode == 2 and "'A-0' (the flag store is at it)" in res.stderr, res.stderr

    (home.root / "governance" / "policy.yaml").write_text(text)  # put back: all is well
    assert "phase: A-0" in rollout(home, "flags", "show").stdout
