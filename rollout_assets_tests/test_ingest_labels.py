"""Labels and kinds on the Collector's two ingest paths (an independent audit's cases, kept).

The fast path stages an event's kind as a number in its `flags` and its tenant and environment
as their JSON text; the store turns a range's distinct texts into values (a bound list, or the
quotes cut row by row past `_LABEL_LOOKUP_MAX` texts) and labels grow their ENUMs up to
`MAX_LABELS`, then turn VARCHAR. Each test feeds both paths the same bytes (`twin`), compares
the tables row for row, and also holds the stored kind, tenant and environment of every line
to what `validate_line` reads: both paths share the store, so agreeing alone would not do.
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout_assets.collect import compute_window_metrics, exclusions_by_window
from rollout_assets.events import line_bytes, validate_line
from rollout_assets.warehouse import connect
from rollout_assets_tests.test_ingest_paths import NOW, PHASES, POLICY, Twin, compact, ev, lines


@pytest.fixture
def twin(tmp_path):
    t = Twin(tmp_path)
    yield t
    t.close()


def expected(data: bytes):
    """(line_no -> (kind, tenant, environment)) the validator gives each accepted line."""
    out = {}
    for i, raw in enumerate(data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"),
                            start=1):
        row, _, _ = validate_line(line_bytes(raw, i), frozenset(PHASES), NOW)
        if row is not None:
            out[i] = (row[4], row[9], row[10])
    return out


def stored(con, file_like: str = "%") -> dict:
    """line_no -> (kind, tenant, environment) the fast warehouse holds, of files like this."""
    return {r[0]: tuple(r[1:]) for r in con.execute(
        "select line_no, kind::VARCHAR, tenant::VARCHAR, environment::VARCHAR "
        "from canary_event_sources where source_file like ?", [file_like]).fetchall()}


def session_line(event_id: str, fields: str) -> str:
    """A minified A-2 session event with `fields` (raw JSON text) after its required keys."""
    return (f'{{"event_id":"{event_id}","ts":"2025-01-18T09:03:12Z","phase":"A-2",'
            f'"kind":"session",{fields}}}')


def check_sessions(twin, prefix: str, corpus: list[str],
                   spaced: tuple[str, str] | None) -> None:
    """One session line per `corpus` entry (`session_line`), its text replaced as `spaced`
    says (old, new) when given, checked on both paths against the validator."""
    rows = [session_line(f"{prefix}{i}", d) for i, d in enumerate(corpus)]
    if spaced:
        rows = [r.replace(*spaced) for r in rows]
    data = lines(*rows)
    check(twin, "phase-A-2.jsonl", data, exp=expected(data))


def check(twin, name: str, data: bytes, *, exp=None):
    twin.write(name, data)
    stats = twin.ingest()
    counts = twin.assert_same()
    if exp is not None:
        got = stored(twin.cons["fast"], "%" + name)
        for k, v in exp.items():
            assert got.get(k) == v, (k, got.get(k), v)
    return stats, counts


ODD = ["beta", "null", "", " ", " lead", "trail ", 'q"uote', "back\\slash", "\\", '"', '""',
       "\\u0022", "nl\nx", "tab\tx", "nul\x00x", "\x00", "é", "e\u0301", "😀", "👨‍👩‍👧",
       "\u2028", "\x7f", "/", "a/b", "'", "''", "x" * 256, "é" * 256, "😀" * 256,
       "NULL", "None", "null ", "\ufeff", "\ufffd", "\uffff", "%", "_", "\"%"]


def variants(i, t, env):
    body = ev(event_id=f"id{i}", phase="A-2", tenant=t, environment=env)
    return [
        compact(body),  # minified, non-ASCII escaped
        json.dumps(ev(event_id=f"r{i}", phase="A-2", tenant=t, environment=env),
                   separators=(",", ":"), ensure_ascii=False),  # raw
        json.dumps(ev(event_id=f"s{i}", phase="A-2", tenant=t, environment=env)),  # spaced
    ]


@pytest.mark.parametrize("extra", [0, 70])
@pytest.mark.parametrize("canon", [True, False])
def test_odd_labels(twin, extra, canon):
    rows = []
    vals = ODD + [f"t{i}" for i in range(extra)]
    for i, t in enumerate(vals):
        env = vals[(i + 5) % len(vals)]
        for r in variants(i, t, env):
            if canon and r.startswith('{"event_id": '):
                continue
            rows.append(r)
    data = lines(*rows)
    check(twin, "phase-A-2.jsonl", data, exp=expected(data))


NOESC = [v for v in ODD if not any(c in v for c in '"\\\n\t\x00\x7f') and "\u2028" not in v]


@pytest.mark.parametrize("extra", [0, 70])
def test_canonical_raw_labels(twin, extra):
    vals = NOESC + [f"t{i}" for i in range(extra)]
    rows = [json.dumps(ev(event_id=f"r{i}", phase="A-2", tenant=t,
                          environment=vals[(i + 3) % len(vals)]),
                       separators=(",", ":"), ensure_ascii=False) for i, t in enumerate(vals)]
    rows += ['{"event_id":"n3","ts":"2025-01-18T09:03:12Z","phase":"A-2","kind":"crash"}']
    data = lines(*rows)
    stats, counts = check(twin, "phase-A-2.jsonl", data, exp=expected(data))
    assert stats["fast"][0].canonical_lines == len(rows)
    assert counts["events"] == len(rows)


@pytest.mark.parametrize("n", [63, 64, 65, 66])
@pytest.mark.parametrize("how", ["canon", "spaced", "mixed"])
def test_lookup_boundary(twin, n, how):
    rows = []
    for i in range(n):
        t = f"v{i}" if i % 7 else f"w\\{i}\"é"
        if how == "canon" or (how == "mixed" and i % 2):
            r = json.dumps(ev(event_id=f"b{i}", phase="A-2", tenant=t, environment=t),
                           separators=(",", ":"), ensure_ascii=False)
        else:
            r = json.dumps(ev(event_id=f"b{i}", phase="A-2", tenant=t, environment=t))
        rows.append(r)
    data = lines(*rows)
    check(twin, "phase-A-2.jsonl", data, exp=expected(data))


def test_past_max_labels_and_appends(twin):
    """Ranges that bring tenants past MAX_LABELS (VARCHAR), env staying ENUM, appended."""
    data_all = b""
    for r in range(4):
        rows = []
        for i in range(400):
            k = r * 400 + i
            t = f"T{k}" if k % 5 else f'T"{k}\\é'
            rows.append(json.dumps(ev(event_id=f"m{k}", phase="A-2", tenant=t,
                                      environment=["prod", "stag\"e", None, "null"][k % 4],
                                      kind=["autosave", "restore", "merge", "session",
                                            "crash"][k % 5]),
                                   separators=(",", ":") if k % 3 else (", ", ": "),
                                   ensure_ascii=bool(k % 2)))
        chunk = lines(*rows)
        data_all += chunk
        twin.write("phase-A-2.jsonl", chunk)
        twin.ingest()
        twin.assert_same()
    exp = expected(data_all)
    got = stored(twin.cons["fast"])
    assert got == exp
    types = dict(twin.cons["fast"].execute(
        "select name, type from pragma_table_info('canary_events')").fetchall())
    assert types["tenant"] == "VARCHAR"


@pytest.mark.parametrize("extra", [0, 70])
def test_exclusions_downstream(twin, extra):
    rows = []
    k = 0
    for phase in ("A-1", "A-2"):
        for t, env in [("standard", "staging"), ("standard", "production"), ("qa", "staging"),
                       ("qa", "production"), (None, None)]:
            for form in range(3):
                k += 1
                body = ev(event_id=f"x{k}", phase=phase, tenant=t, environment=env)
                if form == 0:
                    r = compact(body)
                elif form == 1:
                    r = json.dumps(body)
                else:
                    r = compact(body).replace('"standard"', '"st\\u0061ndard"').replace(
                        '"staging"', '"st\\u0061ging"')
                rows.append(r)
    for i in range(extra):
        rows.append(compact(ev(event_id=f"y{i}", phase="A-2", tenant=f"t{i}",
                               environment=f"e{i}")))
    twin.write("phase-A-1.jsonl", lines(*[r for r in rows if '"A-1"' in r]))
    twin.write("phase-A-2.jsonl", lines(*[r for r in rows if '"A-1"' not in r]))
    twin.ingest()
    twin.assert_same()
    first = datetime(2025, 1, 18, 9, 0)
    out = {}
    for m, con in twin.cons.items():
        met = compute_window_metrics(con, POLICY, first, first, now=NOW)
        out[m] = (met and [{k: v for k, v in r.items() if k != "computed_at"} for r in met],
                  exclusions_by_window(con, first, first))
    assert out["fast"] == out["strict"]
    ex = out["fast"][1]
    a1 = ex[(first, "A-1")]
    a2 = ex[(first, "A-2")]
    assert a1 == {"staging": 6, "outside_canary": 3}
    assert a2 == {"staging": 6}


RAWBYTES = [b"\t", b"\x01", b"\x1f", b"\x00", b"\r", b"\xff", b"\xed\xa0\x80", b"\xc0\xaf",
            b"\xf4\x90\x80\x80", b"\xe2\x80", b"\xef\xbf\xbf", b"\xc3\xa9"]


@pytest.mark.parametrize("canon", [True, False])
def test_raw_bytes_in_labels(twin, canon):
    rows = []
    for i, b in enumerate(RAWBYTES):
        for col in ("tenant", "environment"):
            line = compact(ev(event_id=f"rb{col}{i}", phase="A-2", **{col: "PLACE"}))
            if not canon:
                line = line.replace(",", ", ")
            rows.append(line.encode().replace(b"PLACE", b"a" + b + b"z"))
        rows.append(compact(ev(event_id=f"ok{i}", phase="A-2")).encode())
    data = lines(*rows)
    check(twin, "phase-A-2.jsonl", data, exp=expected(data))


def test_sparse_python_labels(twin):
    """Python-validated rows (spaced) whose labels are mostly absent."""
    rows = [json.dumps(ev(event_id=f"sp{i}", phase="A-2", drop=["tenant", "environment"]))
            for i in range(3000)]
    rows[1777] = json.dumps(ev(event_id="sp-late", phase="A-2", tenant="late\"é",
                               environment="envé"))
    data = lines(*rows)
    check(twin, "phase-A-2.jsonl", data, exp=expected(data))


DUPS = [
    '"tenant":"a","tenant":"b"',
    '"tenant":null,"tenant":"b"',
    '"tenant":"a","tenant":null',
    '"tenant":"a","t\\u0065nant":"b"',
    '"t\\u0065nant":"a","tenant":"b"',
    '"tenant":"a","tenant":5',
    '"tenant":5,"tenant":"a"',
    '"environment":"e1","environment":"e2","tenant":"x"',
    '"tenant":"a\\"b","tenant":"c"',
    '"tenant":"nul\\u0000"',
    '"tenant":"\\u0000"',
    '"tenant":"\\ud83d\\ude00"',
    '"tenant":"\\ud800"',
    '"tenant":"\\udc00x"',
    '"tenant":"\\/"',
    '"tenant":"\\u0022"',
    '"tenant":"\\\\"',
    '"tenant":""',
    '"tenant":"null"',
    '"tenant":true',
    '"tenant":{"a":"b"}',
    '"tenant":["a"]',
    '"tenant":1e2',
    '"tenant":NaN',
]


@pytest.mark.parametrize("spaced", [False, True])
def test_duplicate_and_escaped_keys(twin, spaced):
    check_sessions(twin, "dk", DUPS, spaced=(",", ", ") if spaced else None)


@pytest.mark.parametrize("per", [30, 300])
def test_files_staged_together_grow_labels(twin, per):
    datas = {}
    for phase in PHASES:
        rows = []
        for i in range(per):
            t = f"{phase}-t{i}" if i % 4 else f"{phase}-\"t{i}"
            e = f"env{i % 50}" if i % 3 else "common"
            body = ev(event_id=f"{phase}-{i}", phase=phase, tenant=t, environment=e,
                      kind=["autosave", "restore", "merge", "session", "crash"][i % 5])
            rows.append(compact(body) if i % 5 else json.dumps(body))
        datas[phase] = lines(*rows, "junk")
        twin.write(f"phase-{phase}.jsonl", datas[phase])
    twin.ingest()
    twin.assert_same()
    for phase, data in datas.items():
        exp = expected(data)
        got = stored(twin.cons["fast"], f"%phase-{phase}.jsonl")
        assert got == exp
    # append to all, ingest again
    for phase in PHASES:
        more = lines(*(compact(ev(event_id=f"{phase}-more{i}", phase=phase, tenant=f"new{i}"))
                       for i in range(per // 3)))
        datas[phase] += more
        twin.write(f"phase-{phase}.jsonl", more)
    twin.ingest()
    twin.assert_same()


def test_label_lengths(twin):
    vals = ["x" * 257, "é" * 257, "😀" * 257, "e\u0301" * 129, "e\u0301" * 128, "😀" * 255 + "é",
            "\u0000" * 256, "\u0000" * 257, '"' * 256, '"' * 257, "\\" * 256]
    rows = []
    for i, t in enumerate(vals):
        rows += variants(i, t, t)
    data = lines(*rows)
    check(twin, "phase-A-2.jsonl", data, exp=expected(data))


def test_exclusions_when_values_absent_and_after_reopen(twin, tmp_path):
    twin.write("phase-A-1.jsonl", lines(*(compact(ev(event_id=f"a{i}", tenant="qa"))
                                          for i in range(5))))
    twin.ingest()
    twin.assert_same()
    first = datetime(2025, 1, 18, 9, 0)
    for con in twin.cons.values():
        compute_window_metrics(con, POLICY, first, first, now=NOW)
    # reopen, append escaped + raw standard/staging, ingest again
    for m in list(twin.cons):
        twin.cons[m].close()
        twin.cons[m] = connect(twin.homes[m].db_path)
    twin.write("phase-A-1.jsonl", lines(
        compact(ev(event_id="b1", tenant="standard", environment="staging")),
        json.dumps(ev(event_id="b2", tenant="standard")),
        compact(ev(event_id="b3", tenant="st\u00e0ndard")),
        compact(ev(event_id="b4")).replace('"qa"', '"st\\u0061ndard"')))
    twin.ingest()
    twin.assert_same()
    res = {}
    for m, con in twin.cons.items():
        compute_window_metrics(con, POLICY, first, first, now=NOW)
        res[m] = exclusions_by_window(con, first, first)
    assert res["fast"] == res["strict"]
    assert res["fast"][(first, "A-1")] == {"staging": 1, "outside_canary": 2}


LABEL = st.one_of(st.none(), st.text(max_size=6),
                  st.text(alphabet=st.sampled_from('"\\/ \x00\n\té😀\u2028\x7f'), max_size=5),
                  st.sampled_from(["null", "", "standard", "staging", " qa ", "x" * 256]),
                  st.integers(0, 3), st.booleans())


@st.composite
def label_line(draw, i):
    body = ev(event_id=f"h{i}", phase="A-2",
              kind=draw(st.sampled_from(["autosave", "restore", "merge", "session", "crash"])))
    for col in ("tenant", "environment"):
        how = draw(st.sampled_from(["value", "absent"]))
        if how == "absent":
            body.pop(col)
        else:
            body[col] = draw(LABEL)
    style = draw(st.sampled_from(["compact", "ascii", "spaced", "crlf"]))
    if style == "compact":
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    elif style == "ascii":
        text = json.dumps(body, separators=(",", ":"))
    else:
        text = json.dumps(body, ensure_ascii=False)
    if draw(st.booleans()):  # the kind escaped
        k = body["kind"]
        text = text.replace(f'"{k}"', f'"\\u{ord(k[0]):04x}{k[1:]}"', 1)
    data = text.encode("utf-8", "surrogatepass")
    return data + b"\r" if style == "crlf" else data


@st.composite
def label_file(draw):
    n = draw(st.integers(1, 20))
    out = [draw(label_line(i)) for i in range(n)]
    filler = draw(st.sampled_from([0, 0, 30, 70]))
    for j in range(filler):
        out.append(compact(ev(event_id=f"f{j}", phase="A-2", tenant=f"f{j}",
                              environment=f"g{j}")).encode())
    return draw(st.permutations(out))


@settings(max_examples=25,
          deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(first=label_file(), second=label_file())
def test_hypothesis_labels(tmp_path_factory, first, second):
    root = tmp_path_factory.mktemp("twin")
    t = Twin(root)
    try:
        d1 = lines(*first)
        d2 = lines(*[x.replace(b'"h', b'"H').replace(b'"f', b'"F', 1) for x in second])
        check(t, "phase-A-2.jsonl", d1, exp=expected(d1))
        check(t, "phase-A-2.jsonl", d2, exp=None)
        exp = expected(d1 + d2)
        got = stored(t.cons["fast"])
        assert got == exp
    finally:
        t.close()
        shutil.rmtree(root, ignore_errors=True)


LENIENT = ['"tenant":"a\\qb"', '"tenant":"\\x41"', '"tenant":"\\u00"', '"tenant":"\\U0041"',
           '"tenant":/*c*/"a"', '"tenant":"a"//c', "'tenant':'a'", '"tenant":\'a\'',
           '"tenant":"a\\\'b"', '"tenant":"a"\x00', '"tenant":"\\u0000\\u0000"',
           '"tenant":"\\uD83D"', '"tenant":"\\uDE00\\uD83D"', '"tenant": "a" ',
           '"tenant":"a","":"b"', '"tenant":"a","tenant ":"b"', '"tenant":nUll',
           '"tenant":NULL', '"tenant":None', '"tenant":undefined', '"tenant":"\\u00e9\\u0301"']


@pytest.mark.parametrize("spaced", [False, True])
def test_lenient_label_syntax(twin, spaced):
    check_sessions(twin, "ln", LENIENT, spaced=('","', '", "') if spaced else None)


def test_tail_and_completed_lines_with_odd_labels(twin):
    line = compact(ev(event_id="tail1", phase="A-2", tenant='q"x\\é', environment="null"))
    twin.write("phase-A-2.jsonl", lines(compact(ev(event_id="h0", phase="A-2")))
               + line.encode())
    twin.ingest()
    twin.assert_same()
    # the tail's newline arrives with more lines
    twin.write("phase-A-2.jsonl", b"\n" + lines(json.dumps(ev(event_id="h1", phase="A-2",
                                                                 tenant="\u0000"))))
    twin.ingest()
    twin.assert_same()
    # a truncated tail whose rest arrives later
    full = compact(ev(event_id="tail2", phase="A-2", tenant="é\"", environment=""))
    twin.write("phase-A-2.jsonl", full[:30].encode())
    twin.ingest()
    twin.assert_same()
    twin.write("phase-A-2.jsonl", full[30:].encode() + b"\n")
    twin.ingest()
    twin.assert_same()
    got = twin.cons["fast"].execute(
        "select line_no, tenant::VARCHAR, environment::VARCHAR from canary_event_sources "
        "order by line_no").fetchall()
    assert got == [(1, "qa", "production"), (2, 'q"x\\é', "null"), (3, "\x00", "production"),
                   (4, 'é"', "")]


@pytest.mark.parametrize("spaced_every", [0, 7])
def test_one_range_past_max_labels(twin, spaced_every):
    rows = []
    for i in range(1500):
        body = ev(event_id=f"big{i}", phase="A-2", tenant=f"T{i}é" if i % 11 else f"T\"{i}",
                  environment=f"E{i % 200}")
        rows.append(json.dumps(body) if spaced_every and i % spaced_every == 0
                    else json.dumps(body, separators=(",", ":"), ensure_ascii=bool(i % 2)))
    data = lines(*rows)
    check(twin, "phase-A-2.jsonl", data, exp=expected(data))


def test_blank_lines_bom_and_odd_ws_with_labels(twin):
    vals = ODD + [f"t{i}" for i in range(70)]
    rows = [b"\xef\xbb\xbf" + compact(ev(event_id="bom", phase="A-2", tenant="bomé")).encode()]
    for i, t in enumerate(vals):
        rows.append(json.dumps(ev(event_id=f"w{i}", phase="A-2", tenant=t, environment=t),
                               separators=(",", ":"), ensure_ascii=False).encode())
        if i % 9 == 0:
            rows += [b"", b"  \t", b"\r"]
        if i % 13 == 0:
            rows.append(b"\x0b" + compact(ev(event_id=f"vt{i}", phase="A-2", tenant=t)).encode())
    data = lines(*rows)
    for phase in ("A-1", "A-2", "B-0"):  # several files staged together
        twin.write(f"phase-{phase}.jsonl", data.replace(b'"A-2"', f'"{phase}"'.encode())
                   .replace(b'"event_id":"', f'"event_id":"{phase}'.encode()))
    twin.ingest()
    twin.assert_same()
    exp = expected(data)
    got = stored(twin.cons["fast"], "%A-2%")
    assert got == exp
