"""`--device` on every command that runs a model: a device this machine lacks is one line and exit status 2,
before any work; `--device cpu` runs. In-process, through the CLI's own entry point."""
from __future__ import annotations

import pytest
import torch

from longcat_flash.cli import main

COMMANDS = {
    "train": ["train", "--preset", "tiny", "--max-steps", "1", "--out", "{tmp}/run"],
    "grow": ["grow", "{model}", "--out", "{tmp}/grown"],
    "init": ["init", "--preset", "tiny", "--out", "{tmp}/fresh"],
    "generate": ["generate", "--model", "{model}", "--prompt", "x"],
    "chat": ["chat", "--model", "{model}"],
    "serve": ["serve", "--model", "{model}", "--port", "0"],
    "explain": ["explain", "--model", "{model}", "--text", "x", "--out", "{tmp}/explain"],
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("device") / "tiny"
    main(["init", "--preset", "tiny", "--out", str(out), "--dtype", "float32", "--device", "cpu"])
    return out


def longcat(args: list[str], tmp_path, model) -> None:
    main([a.format(tmp=tmp_path, model=model) for a in args])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "tpu", "mps"])
def test_an_unusable_device_is_one_line_and_status_2(command, device, tmp_path, model, capsys):
    with pytest.raises(SystemExit) as exit_:
        longcat(COMMANDS[command] + ["--device", device], tmp_path, model)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"longcat {command}: --device {device}")
    expected = {"cuda": "CUDA is not available", "tpu": "not a device", "mps": "an accelerator this project does "
                "not run on"}[device.partition(":")[0]]  # mps is one torch knows: "not a device" was wrong
    assert expected in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "fresh").exists()  # failed before any work


def test_cpu_device_runs(tmp_path, model, capsys):
    longcat(["generate", "--model", "{model}", "--prompt", "x", "--max-new-tokens", "2", "--device", "cpu"],
            tmp_path, model)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", ["train", "grow", "init", "explain"])
def test_an_empty_out_is_refused_rather_than_writing_into_the_working_directory(command, tmp_path, model,
                                                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [a.format(tmp=tmp_path, model=model) for a in COMMANDS[command]]
    args[args.index("--out") + 1] = ""
    with pytest.raises(SystemExit, match=f"^longcat {command}: --out is empty; name a directory$"):
        main(args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec", ["auto", "cuda"])
def test_each_process_gets_its_own_gpu_or_a_clear_error(spec, monkeypatch):
    """LOCAL_RANK picks the GPU; where a launcher shows each process only its own GPU, that is device 0 (it was
    cuda:LOCAL_RANK, an invalid ordinal from torch.cuda.set_device); more processes than GPUs is a DeviceError."""
    from longcat_flash.device import DeviceError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert resolve_device(spec) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(spec) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match="LOCAL_RANK is 3, but this process sees 2 CUDA devices"):
        resolve_device(spec)


def test_torchs_name_for_the_cpu_is_taken():
    from longcat_flash.device import resolve_device

    assert resolve_device("cpu:0") == resolve_device(" CPU") == torch.device("cpu")  # cpu:0 was "not a device"
