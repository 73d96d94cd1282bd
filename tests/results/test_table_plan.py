"""benchmarks/table_plan.py: the paper's table configs, step times x schedules, a GPU column
from benchmarks/train.py's output."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from lit_divnorm.experiments.timing import format_hours
from tests.cifar.fixtures import write_cifar10
from tests.conftest import REPO_ROOT

GPU_TABLE = """torch 2.14.1+cu130, lightning 2.6.6, NVIDIA H200, threads 16, precision 32-true
small CNN, batch 100 of 3x32x32, median of 30 steps, the three loops in lock-step
norm    loop              ms/step  images/s  lightning overhead  x none
none    lightning             2.5     40000                        1.00
none    bare loop             2.0     50000              +25.0%    1.00
dn*     lightning             4.0     25000                        1.60
dn*     bare loop             3.5     28571              +14.3%    1.75
"""


@pytest.fixture(scope="module")
def table_plan():
    spec = importlib.util.spec_from_file_location(
        "table_plan", REPO_ROOT / "benchmarks" / "table_plan.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["table_plan"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["table_plan"]


def test_tables_are_the_papers_rows(table_plan):
    stems = [path.stem for path in table_plan.table_configs("cifar10")]
    paper = "baseline baseline_wd_dropout baseline_l1 bn bn_l1 bn_s bn_star ln ln_l1 ln_s ln_star"
    assert stems == [*paper.split(), "dn", "dn_star"]  # Table 3's 13 rows, in its order
    assert len(table_plan.table_configs("lstm")) == 12
    sr = [p.relative_to(REPO_ROOT / "configs").as_posix() for p in table_plan.table_configs("sr")]
    assert sr == [f"sr/x{s}/{n}.yaml" for s in (3, 4) for n in ("baseline", "bn", "dn_star")]
    assert [p.stem for p in table_plan.table_configs("lstm", ["dn", "bn"])] == ["bn", "dn"]
    with pytest.raises(ValueError, match="table must be one of"):
        table_plan.table_configs("cifar100")


# the same benchmark with a data path column (DataLoader path and the fast path)
GPU_TABLE_PATHS = """torch 2.14.1+cu130, lightning 2.6.6, NVIDIA H200, threads 16, precision 32-true
small CNN, batch 100 of 3x32x32 uint8 (mean image subtracted), median of 30 steps
norm   path    loop           ms/step  images/s  lightning overhead  x none  x loader
none   loader  lightning          3.0     33333                        -         -
none   fast    lightning          1.5     66667                     1.00      0.50
bn-l1  loader  lightning          3.3     30303                        -         -
bn-l1  fast    lightning          1.7     58824                     1.13      0.52
baseline-l1loader  lightning      3.1     32258                        -         -
baseline-l1fast    bare loop      1.4     71429               +7.1%   0.93      0.45
"""


def test_gpu_table_is_read_from_train_py_output(table_plan, tmp_path):
    path = tmp_path / "gpu.txt"
    path.write_text(GPU_TABLE)
    device, steps = table_plan.read_gpu_table(path)
    assert "NVIDIA H200" in device and steps == {"none": 2.5, "dn*": 4.0}
    assert table_plan.read_gpu_table(path, "bare loop")[1] == {"none": 2.0, "dn*": 3.5}
    path.write_text(GPU_TABLE_PATHS)
    assert table_plan.read_gpu_table(path)[1] == {"none": 1.5, "bn-l1": 1.7}  # fast path
    loader = table_plan.read_gpu_table(path, data_path="loader")[1]
    assert loader == {"none": 3.0, "bn-l1": 3.3, "baseline-l1": 3.1}  # a name filling its column
    assert table_plan.read_gpu_table(path, "bare loop")[1] == {"baseline-l1": 1.4}
    path.write_text("nothing here\n")
    with pytest.raises(ValueError, match="has no 'lightning' rows"):
        table_plan.read_gpu_table(path)


def test_plan_multiplies_schedule_steps_by_the_measured_step(table_plan, tmp_path, capsys):
    data = tmp_path / "data"
    write_cifar10(data / "cifar10", batches=(1,), n=32)
    gpu = tmp_path / "gpu.txt"
    gpu.write_text(GPU_TABLE)
    args = ["--tables", "cifar10", "--rows", "dn_star", "bn", "--steps", "2", "--warmup", "1"]
    args += ["--data", str(data), "--gpu-table", str(gpu), "--seeds", "2"]
    planned = table_plan.main([*args, "--", "--data.num_workers=0"])
    out = capsys.readouterr().out
    bn, dn_star = planned["cifar10"]
    assert (bn.norm, dn_star.norm) == ("bn", "dn*")
    for row in (bn, dn_star):
        assert row.timing.schedule_steps == 80000  # the normalized rows' schedule
        assert len(row.timing.intervals) == 2 and row.timing.step_seconds > 0
        assert row.cpu_hours == pytest.approx(80000 * row.timing.step_seconds / 3600)
    assert dn_star.gpu_ms == 4.0 and not dn_star.gpu_estimated
    assert bn.gpu_ms == 4.0 and bn.gpu_estimated  # bn was not benchmarked: the slowest norm
    assert dn_star.gpu_hours == pytest.approx(80000 * 4.0 / 3.6e6)
    cpu_total = bn.cpu_hours + dn_star.cpu_hours
    assert f"total, 1 seed: CPU {format_hours(cpu_total)}, 2 seeds: CPU" in out
    assert f"one GPU: {format_hours(2 * 80000 * 4.0 / 3.6e6)}, 2 seeds" in out
    assert "~    4.00" in out  # the estimated row is marked
