"""The GPU run, without a GPU: its device plan against the device tool's limits, bench/gpu.py's
measuring code on the CPU (--smoke), and the GPU tests (tests/gpu) on the CPU at toy sizes.

The device time is 15 minutes a session and the machine is lent to some tasks only, so whatever can
break the run must break here first: a command without a time limit, a carry over 64 MiB, a
section that loses its numbers when it is stopped, a test in tests/gpu that no longer runs.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_plan  # noqa: E402

# steps that can take time, so each must run under `timeout`
SLOW = re.compile(r"\b(python3|pip|cp|cat|sha256sum|nvidia-smi|pytest|tar)\b")
WRITES = re.compile(r"(?:tee |(?<![0-9&])> ?|--junitxml=|--out )(\S+)")
QUIET = {"OMP_WAIT_POLICY": "passive"}  # spinning OpenMP threads slow every process on a shared machine


# -- the device plan ----------------------------------------------------------------------------------


def _check_call(call: gpu_plan.Call, tree: int) -> None:
    limits = gpu_plan.LIMITS
    assert 0 < call.timeout_s <= limits["timeout_s"] and len(call.command) <= limits["command_chars"], call.title
    assert len(call.carry) <= limits["carry_paths"] and len(call.out) <= limits["out_files"], call.title
    assert tree + sum(gpu_plan.sizes(REPO, call).values()) <= limits["carry_bytes"], call.title
    for step in call.steps:
        if SLOW.search(step.text):
            assert step.limit_s > 0 and step.shell().startswith(f"timeout {'-s INT ' if step.interrupt else ''}"), step
        else:
            assert step.limit_s == 0 and step.text.startswith(("export ", "mkdir ", "ls ")), step
        for target in WRITES.findall(step.text):  # what a step writes goes to $OUT: that is what comes back
            assert target == "$OUT" or target.startswith("$OUT/") or target == "archive.tar.xz", step
    assert call.command == "; ".join(step.shell() for step in call.steps)
    assert subprocess.run(["bash", "-n", "-c", call.command]).returncode == 0, call.command  # it parses
    assert sum(s.limit_s + s.grace_s for s in call.steps) == call.limits_s < call.timeout_s, call.title


def test_the_device_plan_fits_the_device_limits():
    """Each call within the tool's limits, every slow step under `timeout` with the steps' limits
    adding up to less than the call's timeout_s, results written under $OUT; phase 1 and phase 2
    within the session's device time when the start and phase 1 take what they typically do."""
    calls, why_not = gpu_plan.device_plan(REPO)
    assert why_not is None and [c.title.split(":")[0].split(",")[0] for c in calls][:2] == ["phase 1", "phase 2"]
    tree = gpu_plan.tree_bytes(REPO)
    assert 0 < tree < 8 * 2**20  # the project's files; a stray large file would crowd out the carry
    for call in calls:
        _check_call(call, tree)
    first, rest = calls[0], calls[1:]
    assert first.carry == [gpu_plan.PHASE1_WHEELS] and "DALI" not in first.command and "dali" not in first.command
    assert "pytest tests/gpu " in first.command and "bench/gpu.py --phase 1" in first.command
    assert first.command.index("pytest") < first.command.index("bench/gpu.py")  # correctness first
    assert all(len(c.carry) == 1 and c.timeout_s == gpu_plan.PART_CALL_S for c in rest[:-1])
    assert "sha256sum -c" in rest[-1].command and "tests/gpu/test_dali.py" in rest[-1].command
    start = sum(gpu_plan.START_S) // 2
    assert start + gpu_plan.needed_s([first]) - first.timeout_s + first.typical_s + gpu_plan.needed_s(rest) \
        <= gpu_plan.LIMITS["session_s"]
    # at worst phase 1 still ends inside the session
    assert gpu_plan.START_S[1] + gpu_plan.needed_s([first]) <= gpu_plan.LIMITS["session_s"]


@pytest.mark.parametrize("left_s", [1000, 330, 300])
def test_phase_two_is_sized_to_the_device_time_left(left_s):
    calls, why_not = gpu_plan.device_plan(REPO, left_s)
    assert why_not is None
    phase2 = calls[1:]
    assert gpu_plan.needed_s(phase2) <= left_s
    for call in phase2:
        _check_call(call, gpu_plan.tree_bytes(REPO))


def test_phase_two_is_left_out_when_too_little_time_is_left():
    calls, why_not = gpu_plan.device_plan(REPO, 150)
    assert len(calls) == 1 and why_not.startswith("phase 2 does not fit: 150 s of device time left")


def test_the_dry_run_prints_the_calls_without_importing_torch():
    """`python bench/gpu.py --plan` as the docstring types it (torch made unimportable: it runs
    between device calls, inside the machine's 30 s idle window)."""
    script = ("import runpy, sys; sys.modules['torch'] = None;"
              f" sys.argv = ['gpu.py', '--plan', '--left-s', '300'];"
              f" runpy.run_path({str(REPO / 'bench/gpu.py')!r}, run_name='__main__')")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 20
    calls, _ = gpu_plan.device_plan(REPO, 300)
    for call in calls:
        assert f"command: {call.command}" in result.stdout and f"timeout_s={call.timeout_s} " in result.stdout
        assert f"carry {call.carry}" in result.stdout
    assert "MiB" in result.stdout and "working tree:" in result.stdout


def test_the_docstring_budget_and_the_carry_script_agree_with_the_plan():
    doc = (REPO / "bench/gpu.py").read_text().split('"""')[1]
    calls, _ = gpu_plan.device_plan(REPO)
    assert f"timeout_s={calls[0].timeout_s}," in doc and f"timeout_s={gpu_plan.PART_CALL_S}," in doc
    parts = [f"part-0{k}" for k in range(gpu_plan.EXPECTED["dali_parts"])]
    assert f"(at most {gpu_plan.phase2(parts, 10**4)[-1].timeout_s});" in doc
    needs = int(re.search(r"it needs (\d+) s", gpu_plan.phase2(parts, 0)).group(1))
    assert f"needs ≥ {needs} s of" in doc and isinstance(gpu_plan.phase2(parts, needs), list)
    script = (REPO / "bench/gpu_carry.sh").read_text()
    assert f"PART_BYTES={gpu_plan.PART_BYTES} " in script
    assert f'OUT={gpu_plan.WHEELS}\n' in script and '"$OUT/phase1"' in script and '"$OUT/dali/part-"' in script


# -- bench/gpu.py, smoke mode ---------------------------------------------------------------------------


def _gpu_smoke(tmp_path, *options: str, hide: tuple[str, ...] = ()) -> subprocess.Popen:
    """bench/gpu.py --smoke run from outside the repository (no `pip install -e .` needed), with SciPy
    (and `hide`) unimportable, as on a bare GPU machine (svd then uses torch.linalg.eigh)."""
    hidden = ["scipy", "scipy.linalg", *hide]
    script = (f"import runpy, sys; sys.modules.update(dict.fromkeys({hidden!r}));"
              f" sys.argv = ['gpu.py', '--smoke', '--out', {str(tmp_path / 'results')!r}, *{list(options)!r}];"
              f" runpy.run_path({str(REPO / 'bench/gpu.py')!r}, run_name='__main__')")
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=os.environ | QUIET)


def _saved(tmp_path) -> tuple[dict, str]:
    (path,) = (tmp_path / "results").glob("gpu_*_cpu-smoke.json")
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_gpu_benchmark_smoke_measures_every_section_on_the_cpu(tmp_path):
    """Both phases' sections on the CPU: each model's three variants eager, VGG-16 per layer (and by
    hand) and compiled, a projection, GoogLeNet fed from JPEGs through DALI's CPU pipeline."""
    run = _gpu_smoke(tmp_path, "--budget-s", "3600")
    output = run.communicate()[0]
    assert run.returncode == 0, output[-4000:]
    saved, markdown = _saved(tmp_path)
    sections = saved["sections"]
    assert list(sections) == ["vgg16", "vgg16-layers", "alexnet", "googlenet", "vgg16-compiled", "projection", "from-jpeg"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(sections, "ok"), sections
    models = saved["models"]
    for name in ("vgg16", "alexnet", "googlenet"):
        eager = models[name]["eager"]
        assert list(eager) == ["dense", "factorized", "auto"] and eager["dense"]["speedup"] == 1.0
        assert all(v["images_per_s"] > 0 and v["median_s"] > 0 for v in eager.values())
        plan = {layer["module"]: layer["execution"] for layer in models[name]["plan"]["layers"]}
        assert set(plan) == set(models[name]["ranks"]) and set(plan.values()) <= {"factorized", "composed"}
        assert models[name]["theoretical"] > 1.0
    vgg = models["vgg16"]
    assert set(vgg["compiled"]) == {"dense", "factorized", "auto"} and all(s > 0 for s in vgg["compile_s"].values())
    rows = vgg["layers"]["layers"]
    assert len(rows) == 13 and {r["module"]: r["execution"] for r in rows if r["execution"] != "dense"} == plan_of(vgg)
    assert vgg["layers_by_hand"]["total"] == 26 and all(row["hand_ms"] > 0 for row in vgg["layers_by_hand"]["rows"])
    projection = models["alexnet"]["projection"]
    assert projection["project_every"] == 100 and 0 < projection["fraction"] < 1
    jpeg = models["googlenet"]["from_jpeg"]
    assert jpeg["backend"] == "dali-cpu" and jpeg["images_per_s"] > 0 and jpeg["synthetic_images_per_s"] > 0
    assert "| vgg16 | compiled | auto | 2 |" in markdown and "## vgg16, per layer" in markdown
    assert "Target, VGG-16 at the authors' ranks compiled ≥ 1.6× dense: factorized" in markdown
    assert "no data" not in saved["summary"]


def plan_of(record: dict) -> dict:
    return {layer["module"]: layer["execution"] for layer in record["plan"]["layers"]}


def test_a_section_the_budget_cannot_cover_is_skipped(tmp_path):
    run = _gpu_smoke(tmp_path, "--sections", "alexnet,googlenet", "--budget-s", "1")
    output = run.communicate()[0]
    assert run.returncode == 0, output[-4000:]
    sections = _saved(tmp_path)[0]["sections"]
    assert sections["alexnet"]["status"] == "ok"  # it started inside the budget and took more than a second
    assert sections["googlenet"]["status"] == "skipped" and sections["googlenet"]["reason"].startswith("time budget")


def test_a_missing_optional_package_is_a_skip_naming_it(tmp_path):
    """pydantic unimportable: the projection (it reads the config's default interval) is skipped,
    naming it, not failed; exit 0."""
    run = _gpu_smoke(tmp_path, "--sections", "projection", hide=("pydantic",))
    output = run.communicate()[0]
    assert run.returncode == 0, output[-4000:]
    section = _saved(tmp_path)[0]["sections"]["projection"]
    assert section["status"] == "skipped" and section["reason"] == "pydantic is not installed", section


def test_a_run_stopped_by_its_time_limit_keeps_what_it_measured(tmp_path):
    """`timeout -s INT` (the device plan's) in the middle of a section: the sections before it are
    in the JSON and the markdown, that one says it was interrupted, and the exit code is 1."""
    run = _gpu_smoke(tmp_path, "--sections", "googlenet,vgg16-compiled", "--budget-s", "3600")
    for line in run.stdout:
        if line.startswith("== vgg16-compiled"):
            time.sleep(1.0)
            run.send_signal(signal.SIGINT)
            break
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 1, output[-4000:]
    saved, markdown = _saved(tmp_path)
    assert saved["sections"]["googlenet"]["status"] == "ok" and saved["models"]["googlenet"]["eager"]
    assert saved["sections"]["vgg16-compiled"]["status"] == "interrupted"
    assert "| vgg16-compiled | interrupted |" in markdown and "| googlenet | eager | auto |" in markdown


# -- tests/gpu on the CPU -----------------------------------------------------------------------------------


def test_the_gpu_tests_run_on_the_cpu_at_toy_sizes(tmp_path):
    """tests/gpu with LOWRANK_GPU_TESTS_ON_CPU=1: each test passes, or skips for a GPU-only part;
    with what the GPU machine lacks unimportable (SciPy, submitit, DeepSpeed; DALI stays for the
    child process that compares its CPU pipeline with torchvision's)."""
    hidden = ["scipy", "scipy.linalg", "submitit", "deepspeed"]
    script = (f"import sys, pytest; sys.modules.update(dict.fromkeys({hidden!r}));"
              f" sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', 'tests/gpu',"
              f" '--junitxml={tmp_path / 'gpu.xml'}']))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            env=os.environ | QUIET | {"LOWRANK_GPU_TESTS_ON_CPU": "1"})
    assert result.returncode == 0, result.stdout[-4000:]
    report = (tmp_path / "gpu.xml").read_text()
    assert 'failures="0"' in report and 'errors="0"' in report
    skipped = re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", result.stdout)
    assert skipped and all(re.search(r"GPU|CUDA|TF32|toy sizes", reason) for reason in skipped), skipped
    passed = int(re.search(r"(\d+) passed", result.stdout).group(1))
    assert passed >= 15  # the trainer, syncs, the group of one, the layers, the execution forms, the back-ends


def test_the_gpu_tests_skip_naming_a_missing_optional_package():
    """pydantic unimportable, as on a GPU machine without the carried wheels: the trainer's tests
    are skipped, each naming it, and none fails or errors."""
    script = ("import sys, pytest; sys.modules['pydantic'] = None;"
              " sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', 'tests/gpu/test_training.py']))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            env=os.environ | QUIET | {"LOWRANK_GPU_TESTS_ON_CPU": "1"})
    assert result.returncode == 0, result.stdout[-4000:]
    assert "failed" not in result.stdout and "error" not in result.stdout
    assert result.stdout.count("pydantic is not installed") >= 3, result.stdout[-2000:]
