"""The rollout home: one directory holding everything the platform reads and writes.

Resolution order (contract): `--home DIR`, else `ROLLOUT_HOME`, else the current directory.
The policy and templates are read from the home when it carries its own `governance/` and
`templates/`, else from the project checkout this package was installed from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_home(cli_home: str | os.PathLike | None = None) -> Path:
    if cli_home:
        return Path(cli_home).expanduser().resolve()
    env = os.environ.get("ROLLOUT_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return Path.cwd().resolve()


COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip", ".Z")
INSTANCE_OWNER_FILE = "rollout-home.txt"  # in the Dagster instance: the home it serves


class InstanceOfAnotherHome(RuntimeError):
    """The Dagster instance in use serves another rollout home (`check_instance`)."""


@dataclass(frozen=True)
class RolloutHome:
    root: Path

    @classmethod
    def resolve(cls, cli_home: str | os.PathLike | None = None) -> RolloutHome:
        return cls(resolve_home(cli_home))

    # ---- inputs ---------------------------------------------------------------------------
    @property
    def canary_dir(self) -> Path:
        return self.root / "reports" / "canary"

    def canary_files(self) -> list[Path]:
        return sorted(self.canary_dir.glob("phase-*.jsonl"))

    def rotation_dirs(self) -> list[Path]:
        """Where log rotation leaves canary files: beside them, or in a folder inside the
        canary folder (logrotate's `olddir`, e.g. `reports/canary/old/`)."""
        try:
            inside = sorted(p for p in self.canary_dir.iterdir()
                            if not p.name.startswith(".") and p.is_dir() and not p.is_symlink())
        except OSError:
            inside = []
        return [self.canary_dir, *inside]

    def rotated_canary_files(self) -> list[Path]:
        """What log rotation leaves in `rotation_dirs`: `phase-A-1.jsonl.1`,
        `phase-A-1.jsonl-20250118`, `old/phase-A-1.jsonl.1` (regular files; compressed ones
        cannot be read line by line and are left alone)."""
        out = set()
        for folder in self.rotation_dirs():
            for pattern in ("phase-*.jsonl.*", "phase-*.jsonl-*"):
                out.update(p for p in folder.glob(pattern)
                           if not p.name.endswith(COMPRESSED_SUFFIXES) and not p.is_symlink()
                           and p.is_file())
        return sorted(out)

    @property
    def policy_path(self) -> Path:
        """The home's own policy when it has one, else the project's. Anything at the home's
        path counts as its own (a dangling link, a directory): loading it then fails loudly,
        where falling back would judge, and allow drills, under other thresholds and mode."""
        own = self.root / "governance" / "policy.yaml"
        return own if os.path.lexists(own) else PROJECT_ROOT / "governance" / "policy.yaml"

    @property
    def templates_dir(self) -> Path:
        own = self.root / "templates"
        return own if (own / "alerts" / "rollback.md").is_file() else PROJECT_ROOT / "templates"

    # ---- outputs --------------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.root / "data" / "rollout.duckdb"

    @property
    def reader_db_path(self) -> Path:
        """The copy SQL readers query (`warehouse.publish_reader_copy`): never locked by a run."""
        return self.root / "data" / "rollout-read.duckdb"

    @property
    def monitoring_dir(self) -> Path:
        return self.root / "reports" / "monitoring"

    @property
    def alerts_dir(self) -> Path:
        return self.root / "reports" / "alerts"

    @property
    def outbox_dir(self) -> Path:
        return self.root / "reports" / "outbox"

    @property
    def rca_dir(self) -> Path:
        return self.root / "reports" / "rca"

    @property
    def rehearsal_dir(self) -> Path:
        return self.root / "docs" / "rehearsal"

    @property
    def rollback_log_dir(self) -> Path:
        return self.root / "reports" / "rollbacks"

    @property
    def dagster_home(self) -> Path:
        env = os.environ.get("DAGSTER_HOME")  # Dagster needs it absolute
        return Path(env).expanduser().resolve() if env else self.root / ".dagster"

    def check_instance(self, claim: bool = False) -> None:
        """Refuse a Dagster instance that serves another home. The breach sensor's cursor, the
        rollbacks' run keys (`<window>:<phase>`) and the materializations it reads are per
        instance: two homes sharing one (a `DAGSTER_HOME` exported for both) skip their own
        rollbacks as "handled" and roll back each other's flags. The instance names its home
        in `INSTANCE_OWNER_FILE`; `claim` writes this home's name there when it names none (or
        the instance is this home's own `.dagster`, which a moved home carries along)."""
        instance = self.dagster_home
        marker = instance / INSTANCE_OWNER_FILE
        try:
            owner = marker.read_text(encoding="utf-8").removesuffix("\n") or None
        except FileNotFoundError:
            owner = None
        mine = str(self.root)
        if owner == mine:
            return
        if owner is not None and instance.resolve() != (self.root / ".dagster").resolve():
            raise InstanceOfAnotherHome(
                f"the Dagster instance {instance} (DAGSTER_HOME) serves the rollout home "
                f"{owner}, not {mine}: homes sharing an instance act on each other's breaches. "
                "Unset DAGSTER_HOME (each home keeps its own in <home>/.dagster) or point it at "
                f"this home's own instance; if {owner} is gone for good, delete {marker}")
        if claim:
            instance.mkdir(parents=True, exist_ok=True)
            tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
            tmp.write_text(mine + "\n", encoding="utf-8")
            os.replace(tmp, marker)

    def relative(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.root))
        except ValueError:
            return str(path)

    def inside(self, path: Path) -> Path:
        """Return `path` if it resolves under the home, else raise: nothing is written outside."""
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ValueError(f"refusing to write outside the rollout home: {path}")
        return resolved
