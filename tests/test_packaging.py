"""An installed wheel is a working reft_lab: configs and data ship inside the package."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_trains_from_another_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("reft_lab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "reft_lab/conf/train.yaml" in names and "reft_lab/data/tasks/json_answer/test.jsonl" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # the dependencies come from this environment, as a plain path entry: its editable reft_lab
    # (a .pth in that directory) is not processed, so only the wheel's reft_lab can be imported
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
                   check=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    located = subprocess.run([str(python), "-c", "import reft_lab; print(reft_lab.__file__)"], check=True,
                             capture_output=True, text=True, cwd=elsewhere).stdout.strip()
    assert located.startswith(str(site)), located
    run = subprocess.run([str(venv / "bin" / "reft-lab"), "train", "model=tiny", "trainer=smoke", "logger=none",
                          "retention.knowledge_probe=2", "retention.kl_prompts=1", "retention.leakage_prompts=1",
                          "task.test_size=2", "hydra.run.dir=job"], capture_output=True, text=True, cwd=elsewhere,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "disabled",
                              "REFT_LAB_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"status": "ok"' in (elsewhere / "job" / "metrics.json").read_text()
