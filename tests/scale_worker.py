"""A prune in a child process, for test_scale.py: killed with SIGKILL at a chosen point, or one rank of a
torch.distributed group (env RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set by the test).

    python tests/scale_worker.py JSON   with keys: mode (memory|stream), method (or a,b), src, out (may hold
                                        {method}), work, resume,
                                        kill ("LAYER:load" or "LAYER:save"), die_at (a layer where rank 1 exits),
                                        structure (channels|heads|layers: a structured prune, `method` its importance)
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # the same summation order as the in-process runs it is compared with (conftest)

sys.path.insert(0, str(Path(__file__).parent.parent))

from llmprune import PruneConfig  # noqa: E402
from llmprune.errors import LLMPruneError  # noqa: E402
from llmprune.pruning import runner  # noqa: E402
from llmprune.pruning.structured import StructuredConfig, prune_structured  # noqa: E402
from llmprune.scale import checkpoint, streaming  # noqa: E402
from llmprune.scale.distributed import DataParallel  # noqa: E402

CALIBRATION = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))


def kill_at(spec: str) -> None:
    """SIGKILL this process on loading layer k, or while saving layer k's checkpoint (after its weights
    file is renamed in, before state.json is)."""
    layer, point = int(spec.split(":")[0]), spec.split(":")[1]
    current = [None]
    save, replace, load = checkpoint.WorkFolder.save, checkpoint.write_atomically, runner.ModelLayers.load

    def saving(self, i, *args):
        current[0] = i
        return save(self, i, *args)

    def replacing(path, write):
        if point == "save" and current[0] == layer and path.name == checkpoint.STATE:
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(path, write)

    def loading(original):
        def wrapped(self, i):
            if point == "load" and i == layer:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, i)
        return wrapped

    checkpoint.WorkFolder.save, checkpoint.write_atomically = saving, replacing
    runner.ModelLayers.load = loading(load)
    streaming.StreamedLayers.load = loading(streaming.StreamedLayers.load)


def prune_config(job: dict):
    """A PruneConfig, or with job["structure"] a StructuredConfig (its `method` the importance; layers: influence)."""
    if not job.get("structure"):
        return PruneConfig(method=job["method"], batch_size=4)
    if job["structure"] == "layers":
        return StructuredConfig("layers", sparsity=0.4, batch_size=4)
    return StructuredConfig(job["structure"], method=job["method"], sparsity=0.5, round_to=8, batch_size=4)


def run(job: dict):
    config = prune_config(job)
    if job.get("kill"):
        kill_at(job["kill"])
    parallel = DataParallel.from_environment(torch.device("cpu"), timeout_s=60)
    calibration = parallel.share(CALIBRATION) if parallel else CALIBRATION
    if job.get("die_at") is not None and parallel is not None and parallel.rank == 1:  # rank 1 dies
        die_at, load = job["die_at"], runner.ModelLayers.load

        def dying(self, i):
            if i == die_at:
                os._exit(3)
            return load(self, i)
        runner.ModelLayers.load = dying
    if job["mode"] == "stream":
        report = streaming.prune_streamed(job["src"], job["out"], calibration, config, work_dir=job.get("work"),
                                          resume=job.get("resume", False), parallel=parallel, progress=False)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(job["src"], dtype=torch.float32).eval()
        if job.get("work"):
            report = checkpoint.prune_resumable(model, calibration, config, job["work"], job["src"],
                                                resume=job.get("resume", False), progress=False)
        else:
            prune = prune_structured if job.get("structure") else runner.prune
            report = prune(model, calibration, config, progress=False, parallel=parallel)
        if parallel is None or parallel.rank == 0:
            model.save_pretrained(job["out"])
    if parallel is None or parallel.rank == 0:
        Path(job["out"], "report.json").write_text(json.dumps(report.to_dict()))
    return report


if __name__ == "__main__":
    try:
        job = json.loads(sys.argv[1])
        for method in job["method"].split(","):  # several methods in one process: one process group start
            run(job | {"method": method, "out": job["out"].replace("{method}", method)})
    except LLMPruneError as err:
        print(f"llmprune: error: {err}", file=sys.stderr)
        sys.exit(2)
