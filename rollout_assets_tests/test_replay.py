"""Policy replay: a candidate policy re-scores stored windows without touching production."""

from datetime import datetime, timedelta

from rollout_assets.analyze import judge_range, score_range
from rollout_assets.cli import main
from rollout_assets.collect import compute_window_metrics, ingest_canary
from rollout_assets.policy import parse_policy
from rollout_assets.replay import replay
from rollout_assets_tests.conftest import event, write_canary

W0 = datetime(2025, 1, 18, 9, 0)
PRODUCTION_TABLES = ("canary_events", "window_metrics", "slo_scores", "window_verdicts",
                     "notifications", "rollbacks", "flag_state")


def _load(con, home, policy, restore_failures: int):
    lines = []
    for i in range(300):  # 300 restores in A-1 at 09:00, `restore_failures` of them failing
        lines.append(event(event_id=f"r{i}", kind="restore", ok=i >= restore_failures,
                           ts="2025-01-18T09:05:00Z", drop=("latency_ms",)))
    for i in range(20):
        lines.append(event(event_id=f"a{i}", latency_ms=1000.0 + i, ts="2025-01-18T09:06:00Z"))
    write_canary(home, "A-1", lines)
    ingest_canary(con, home, policy)
    compute_window_metrics(con, policy, W0, W0)
    score_range(con, policy, W0, W0, W0)
    judge_range(con, policy, W0, W0, W0)


def _snapshot(con):
    return {t: con.execute(f"select count(*), hash(list(t order by all)::VARCHAR) from {t} t")
            .fetchone() for t in PRODUCTION_TABLES}


def test_stricter_candidate_reports_the_breach_it_would_have_caused(con, home, policy):
    _load(con, home, policy, restore_failures=1)  # 299/300 = 0.99667: passes >= 0.995
    assert con.execute("select breach from window_verdicts").fetchall() == [(False,)]
    before = _snapshot(con)
    stricter = parse_policy(policy.source_text.replace("threshold: 0.995", "threshold: 0.999"))
    replay_id, diffs, compared = replay(con, stricter, W0, W0 + timedelta(minutes=15))
    assert compared == 1
    assert [(d.phase, d.kind, d.candidate.failed_slos, d.candidate.rollback_to)
            for d in diffs] == [("A-1", "new breach", ["restore_success"], "A-0")]
    assert _snapshot(con) == before  # production untouched
    stored = con.execute("select phase, production_breach, candidate_breach, "
                         "candidate_policy_version from replay_diffs where replay_id = ?",
                         [replay_id]).fetchall()
    assert stored == [("A-1", False, True, stricter.version)]


def test_same_policy_changes_nothing_and_exclusions_come_from_the_candidate(con, home, policy):
    _load(con, home, policy, restore_failures=0)
    assert replay(con, policy, W0, W0 + timedelta(minutes=15))[1] == []
    # a candidate that also judges standard-tenant traffic in A-1 sees those failures
    write_canary(home, "A-1", [event(event_id=f"s{i}", kind="restore", ok=False, tenant="standard",
                                     ts="2025-01-18T09:07:00Z", drop=("latency_ms",))
                               for i in range(5)])
    ingest_canary(con, home, policy)
    judged_everywhere = parse_policy(policy.source_text.replace("phases: [A-1]", "phases: [A-2]"))
    _, diffs, _ = replay(con, judged_everywhere, W0, W0 + timedelta(minutes=15))
    assert [d.kind for d in diffs] == ["new breach"]


def _cli_replay(home, candidate) -> int:
    """`rollout replay` of the hour from 09:00 under the candidate policy file."""
    return main(["--home", str(home.root), "replay", "--policy", str(candidate),
                 "--from", "2025-01-18T09:00Z", "--to", "2025-01-18T10:00Z"])


def test_cli_replay_prints_the_diff(con, home, policy, tmp_path, capsys):
    _load(con, home, policy, restore_failures=1)
    con.close()
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(policy.source_text.replace("threshold: 0.995", "threshold: 0.999"))
    assert _cli_replay(home, candidate) == 0
    out = capsys.readouterr().out
    assert "2025-01-18 09:00 A-1: new breach" in out and "extra rollbacks: 1" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(policy.source_text.replace('comparator: ">="', 'comparator: "=>"', 1))
    assert _cli_replay(home, bad) == 2
    assert "comparator" in capsys.readouterr().err


def test_cli_replay_refuses_a_candidate_without_a_phase_with_verdicts(con, home, policy,
                                                                      tmp_path, capsys):
    """A candidate without A-1 replayed A-1's breach as "0 would change" (found by an
    independent audit): such a policy could never be deployed (`run` refuses it), so replay
    refuses it the same way; a looser one counts the rollbacks it would not have run."""
    import yaml

    _load(con, home, policy, restore_failures=10)  # 290/300: a P2 breach, rollback to A-0
    con.close()
    raw = yaml.safe_load(policy.source_text)
    for ph in raw["phases"]:
        if ph["name"] == "A-1":
            ph["name"] = "A-9"
    for ex in raw.get("exclusions", []):
        if isinstance(ex.get("phases"), list):
            ex["phases"] = ["A-9" if p == "A-1" else p for p in ex["phases"]]
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert _cli_replay(home, renamed) == 2
    err = capsys.readouterr().err
    assert "the policy has no phase 'A-1'" in err and len(err.strip().splitlines()) == 1
    looser = tmp_path / "looser.yaml"
    looser.write_text(policy.source_text.replace("threshold: 0.995", "threshold: 0.95"))
    assert _cli_replay(home, looser) == 0
    out = capsys.readouterr().out
    assert "no longer a breach" in out and "rollbacks that would not run: 1" in out
