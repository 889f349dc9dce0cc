"""The options objects: bad values refused as one line naming the flag, flags
(environment variables and -v included) reaching their fields by name, and
every engine a command makes built from the same options, a context file's
included."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
import typer
from typer.main import get_command
from typer.testing import CliRunner

from lmqa.cli import app
from lmqa.engine.generation import SamplingConfig
from lmqa.flags import OffloadOpt, PrefillOpt, options_of
from lmqa.options import EngineOptions, ModelOptions, OptionError, ReadOptions
from lmqa.qa.context_file import load, save
from test_context_file import document, ingested, loaded  # noqa: F401 (fixtures)


@pytest.mark.parametrize("given, says", [
    ({"kv_offload": "disk"}, "--kv-offload must be cpu, device or auto, not 'disk'"),
    ({"prefill": "diagonal"}, "--prefill must be layer or serial, not 'diagonal'"),
    ({"max_gpu_memory": "lots"}, "--max-gpu-memory: not a size"),
    ({"kv_dtype": "fp8"}, "--kv-dtype: unknown kv dtype 'fp8'"),
])
def test_engine_options_refuse_a_bad_value_naming_its_flag(given, says):
    with pytest.raises(OptionError, match=says):
        EngineOptions(**given)


def test_read_options_take_typer_values():
    assert ReadOptions(include=None, exclude=["*.md"]).include == ()
    assert ReadOptions(include=["src/"]).include == ("src/",)
    with pytest.raises(OptionError, match="--max-memory: not a size"):
        ReadOptions(max_memory="-5")


def test_options_of_reads_the_commands_flags_its_environment_and_the_apps_v():
    seen = []
    demo = typer.Typer()

    @demo.callback()
    def main(verbose: bool = typer.Option(False, "--verbose", "-v")):
        pass

    @demo.command()
    def run(ctx: typer.Context, prefill: PrefillOpt = "layer", kv_offload: OffloadOpt = "auto"):
        seen.append(options_of(ctx, EngineOptions, max_gpu_memory="2GiB"))

    res = CliRunner().invoke(demo, ["-v", "run", "--prefill", "serial"], env={"LMQA_KV_OFFLOAD": "cpu"})
    assert res.exit_code == 0, res.output
    assert seen == [EngineOptions(kv_offload="cpu", prefill="serial", max_gpu_memory="2GiB", verbose=True)]


def test_every_shared_flag_is_named_as_the_field_it_sets():
    """options_of finds a flag by its parameter's name: `--kv-offload` must be
    `kv_offload`, or the command would silently run with the default."""
    names = {f.name for cls in (ModelOptions, EngineOptions, ReadOptions, SamplingConfig) for f in fields(cls)}
    group = get_command(app)
    commands = [c for c in group.commands.values() if not hasattr(c, "commands")]
    assert {"ask", "chat", "ingest", "serve", "passkey", "bench", "eval"} <= {c.name for c in commands}
    for command in commands:
        for param in command.params:
            flag = max(param.opts, key=len).lstrip("-").replace("-", "_")
            if flag in names:
                assert param.name == flag, (command.name, param.opts)


@pytest.mark.parametrize("options, offload, prefill", [
    (EngineOptions(), "cpu", "layer"),  # auto: the blocks stay in the file's map, in host memory
    (EngineOptions(kv_offload="cpu", prefill="serial", max_gpu_memory="1GiB"), "cpu", "serial"),
])
def test_a_context_files_engine_has_the_commands_options(loaded, document, tmp_path, options, offload, prefill):  # noqa: F811
    save(ingested(loaded, document, kv_dtype=torch.float16), tmp_path / "ctx.lmqa")
    engine = load(tmp_path / "ctx.lmqa", loaded, options).engine
    assert (engine.offload, engine.prefill) == (offload, prefill)
    assert engine.kv_dtype == torch.float16  # the file's own
