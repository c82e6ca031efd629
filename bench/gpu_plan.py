"""bench/gpu.py's device plan: the exact device-tool calls, what each carries and its time limits.

    python bench/gpu.py --plan                # every call, with the carry sizes measured here
    python bench/gpu.py --plan --left-s 290   # phase 2 sized for the device time left after phase 1

Only the standard library: the dry run runs here between two device calls, inside the machine's
30 s idle window, so it must not spend seconds importing torch. bench/gpu.py's docstring explains
the plan and its budget; tests/test_gpu_bench.py checks these calls against the device's limits.

Every step of a command that can take time runs under `timeout` (SIGINT first, so pytest and
bench/gpu.py write what they have, then SIGKILL after a grace), and the limits of a command's
steps add up to less than its call's timeout_s: a call always returns, and returns its files.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = ".gpu_wheels"  # bench/gpu_carry.sh writes it; git-ignored
PHASE1_WHEELS = f"{WHEELS}/phase1"
DALI_PARTS = f"{WHEELS}/dali"

# the device tool's limits (/work/.library/device/README.md), and this plan's own figures
LIMITS = {"carry_bytes": 64 * 2**20, "timeout_s": 600, "command_chars": 2000, "carry_paths": 8, "out_files": 8,
          "session_s": 900, "start_needs_s": 240, "idle_s": 30}
START_S = (120, 240)  # a cold start, with the transfer (the 2-4 min)
CALL_OVERHEAD_S = 10  # device time a call takes besides its command: sending the tree and carry, the reply
PART_BYTES = 60_000_000  # bench/gpu_carry.sh's split size
EXPECTED = {"phase1_bytes": 3_000_000, "dali_parts": 3}  # as measured here (bench/gpu_carry.sh) before it is built
PART_CALL_S = 30  # timeout_s of a call that only moves one part into /tmp/dali (a few seconds)
GRACE_S = 10  # SIGINT, then SIGKILL this much later
SLACK_S = 15  # between a command's longest run and its call's timeout_s
PHASE1_S = {"pip": 30, "env": 20, "tests": 150, "bench": 240, "typical": 350}
PHASE2_FIXED_S = {"pip": 15, "copy": 10, "join": 15, "unpack": 40}  # step limits before phase 2's tests
PHASE2_TESTS_S = 50
PHASE2_BENCH_S = (45, 100)  # the least worth a call (VGG-16's projection and from-JPEG rate), and the most used

PIP = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site"
       f" {PHASE1_WHEELS}/*.whl")
ENV = "export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/tmp/site"
# DALI into the machine's own site-packages, beside torch's nvidia/ libraries (DALI finds nvJPEG in
# nvidia/cu13/lib through its runpath), never over a file that is there already
UNPACK = ("python3 -c 'import os, site, tarfile; d = site.getsitepackages()[0];"
          " keep = lambda m, p: None if os.path.lexists(os.path.join(p, m.name)) else tarfile.data_filter(m, p);"
          " tarfile.open(\"/tmp/dali/archive.tar.xz\").extractall(d, filter=keep); print(\"DALI unpacked into\", d)'")


@dataclass
class Step:
    """One shell step: `text` under `timeout` (limit_s, then grace_s more to a SIGKILL), or a bare
    instant step (export, mkdir) when limit_s is 0."""
    text: str
    limit_s: int = 0
    grace_s: int = 0
    interrupt: bool = False  # SIGINT rather than SIGTERM: pytest and bench/gpu.py save what they have

    def shell(self) -> str:
        if not self.limit_s:
            return self.text
        signal = "-s INT " if self.interrupt else ""
        grace = f"-k {self.grace_s} " if self.grace_s else ""
        return f"timeout {signal}{grace}{self.limit_s} {self.text}"


@dataclass
class Call:
    title: str
    steps: list[Step]
    carry: list[str]
    timeout_s: int
    typical_s: int  # device time it takes when all goes well, a cold start excluded
    out: list[str] = field(default_factory=list)  # the files it leaves in $OUT

    @property
    def command(self) -> str:
        return "; ".join(step.shell() for step in self.steps)

    @property
    def limits_s(self) -> int:
        """The longest the command can run: its steps' limits and graces."""
        return sum(step.limit_s + step.grace_s for step in self.steps)


def _timed(limit_s: int, command: str, log: str) -> Step:
    return Step(f"{command} 2>&1 | tee $OUT/{log}", limit_s, GRACE_S, interrupt=True)


def phase1() -> Call:
    """The trainer, NCCL and the layers (tests/gpu), then the speed tables (bench/gpu.py --phase 1)."""
    t = PHASE1_S
    steps = [Step(ENV), Step(PIP, t["pip"]), Step("nvidia-smi > $OUT/env.txt 2>&1", t["env"]),
             _timed(t["tests"], "python3 -m pytest tests/gpu -v -p no:cacheprovider --junitxml=$OUT/tests.xml",
                    "tests.log"),
             _timed(t["bench"], f"python3 bench/gpu.py --phase 1 --budget-s {t['bench'] - SLACK_S} --out $OUT",
                    "bench.log")]
    call = Call("phase 1: tests/gpu, then VGG-16 (eager, per layer, compiled), AlexNet and GoogLeNet (eager)",
                steps, [PHASE1_WHEELS], timeout_s=0, typical_s=t["typical"],
                out=["env.txt", "tests.xml", "tests.log", "bench.log", "gpu_<date>_<card>_phase1.json",
                     "gpu_<date>_<card>_phase1.md"])
    call.timeout_s = call.limits_s + SLACK_S
    return call


def phase2(parts: list[str], left_s: int) -> list[Call] | str:
    """DALI's parts, one a call, then the last part, the checks and the measurements, sized so that
    all of it ends within `left_s` of device time; or why not, when that cannot cover them."""
    calls = [Call(f"phase 2, part {k + 1} of {len(parts)}: into /tmp/dali (the machine keeps /tmp while warm)",
                  [Step("mkdir -p /tmp/dali"), Step(f"cp {DALI_PARTS}/{part} /tmp/dali/", 20), Step("ls -l /tmp/dali")],
                  [f"{DALI_PARTS}/{part}"], PART_CALL_S, typical_s=10)
             for k, part in enumerate(parts[:-1])]
    available = left_s - (PART_CALL_S + CALL_OVERHEAD_S) * len(calls) - CALL_OVERHEAD_S  # the last call's timeout_s
    before_bench = sum(PHASE2_FIXED_S.values()) + PHASE2_TESTS_S + 2 * GRACE_S
    bench_s = min(PHASE2_BENCH_S[1], available - SLACK_S - before_bench)
    if bench_s < PHASE2_BENCH_S[0]:
        needed = left_s - available + SLACK_S + before_bench + PHASE2_BENCH_S[0]
        return f"phase 2 does not fit: {left_s} s of device time left, it needs {needed} s"
    joined = ("sh -c 'cd /tmp/dali && cat part-* > archive.tar.xz && sha256sum -c archive.sha256'"
              " || { ls -l /tmp/dali; echo 'a DALI part is missing (a fresh machine?): phase 2 from its first call'; exit 4; }")
    steps = [Step(ENV), Step(PIP, PHASE2_FIXED_S["pip"]), Step("mkdir -p /tmp/dali"),
             Step(f"cp {DALI_PARTS}/{parts[-1]} {DALI_PARTS}/archive.sha256 /tmp/dali/", PHASE2_FIXED_S["copy"]),
             Step(joined, PHASE2_FIXED_S["join"]), Step(UNPACK, PHASE2_FIXED_S["unpack"]),
             _timed(PHASE2_TESTS_S, "python3 -m pytest tests/gpu/test_dali.py -v -p no:cacheprovider"
                    " --junitxml=$OUT/tests-dali.xml", "tests-dali.log"),
             _timed(bench_s, f"python3 bench/gpu.py --phase 2 --budget-s {bench_s - SLACK_S} --out $OUT",
                    "bench-dali.log")]
    last = Call(f"phase 2, part {len(parts)} of {len(parts)}, then DALI's check (tests/gpu/test_dali.py), the"
                " projection cost and the from-JPEG rate (bench/gpu.py --phase 2)",
                steps, [PHASE1_WHEELS, f"{DALI_PARTS}/{parts[-1]}", f"{DALI_PARTS}/archive.sha256"],
                timeout_s=0, typical_s=30 + PHASE2_TESTS_S // 2 + bench_s,
                out=["tests-dali.xml", "tests-dali.log", "bench-dali.log", "gpu_<date>_<card>_phase2.json",
                     "gpu_<date>_<card>_phase2.md"])
    last.timeout_s = last.limits_s + SLACK_S
    return calls + [last]


def needed_s(calls: list[Call]) -> int:
    """The device time a list of calls can take at most, a start excluded."""
    return sum(call.timeout_s + CALL_OVERHEAD_S for call in calls)


def dali_parts(root: Path) -> list[str]:
    found = sorted(p.name for p in (root / DALI_PARTS).glob("part-*"))
    return found or [f"part-{k:02d}" for k in range(EXPECTED["dali_parts"])]


def tree_bytes(root: Path) -> int:
    """What every call sends besides its carry: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((root / name).stat().st_size for name in listed if name and (root / name).is_file())


def carry_bytes(root: Path, path: str) -> int | None:
    """Bytes under a carried path, or None if it is not built yet."""
    target = root / path
    if target.is_file():
        return target.stat().st_size
    files = [p for p in target.rglob("*") if p.is_file()] if target.is_dir() else []
    return sum(p.stat().st_size for p in files) if files else None


def sizes(root: Path, call: Call) -> dict[str, int | None]:
    """Each carried path's bytes; unbuilt ones at their expected size (the part size for a DALI part)."""
    found = {}
    for path in call.carry:
        size = carry_bytes(root, path)
        if size is None:
            size = EXPECTED["phase1_bytes"] if path == PHASE1_WHEELS else PART_BYTES if "part-" in path else 100
        found[path] = size
    return found


def device_plan(root: Path = REPO, left_s: int | None = None) -> tuple[list[Call], str | None]:
    """The calls in order, and why phase 2 is left out (None if it is in). `left_s`: the device time
    left after phase 1 (default: the session's budget less a typical start and phase 1)."""
    first = phase1()
    if left_s is None:  # after a typical start and phase 1
        left_s = LIMITS["session_s"] - sum(START_S) // 2 - first.typical_s - CALL_OVERHEAD_S
    second = phase2(dali_parts(root), left_s)
    return ([first], second) if isinstance(second, str) else ([first, *second], None)


def render(root: Path, calls: list[Call], why_not: str | None) -> str:
    tree = tree_bytes(root)
    lines = [f"working tree: {tree / 1e6:.1f} MB (sent with every call)"]
    for number, call in enumerate(calls, 1):
        carried = sizes(root, call)
        built = all(carry_bytes(root, path) is not None for path in call.carry)
        total = tree + sum(carried.values())
        lines += ["", f"call {number} — {call.title}",
                  f"  carry {call.carry}: " + ", ".join(f"{path} {size / 1e6:.1f} MB" for path, size in carried.items())
                  + f"; with the tree {total / 2**20:.1f} of {LIMITS['carry_bytes'] / 2**20:.0f} MiB"
                  + ("" if built else " (expected sizes: run bash bench/gpu_carry.sh first)"),
                  f"  timeout_s={call.timeout_s} (its steps' limits add up to {call.limits_s} s); typically"
                  f" {call.typical_s} s" + (f"; leaves in $OUT: {', '.join(call.out)}" if call.out else ""),
                  f"  command: {call.command}"]
    if why_not:
        lines += ["", why_not]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu.py --plan", description=__doc__.splitlines()[0])
    parser.add_argument("--left-s", type=int, help="device time left after phase 1 (status's budget_left_s)")
    args = parser.parse_args(argv)
    calls, why_not = device_plan(REPO, args.left_s)
    print(render(REPO, calls, why_not))
    return 0


if __name__ == "__main__":
    sys.exit(main())
