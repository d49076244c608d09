"""pipeline.run as a sweep uses it, and its phases' contracts."""

import pytest

from llmprune import pipeline
from llmprune.config import PruneConfig, RecoverConfig, RunConfig
from llmprune.evaluation import perplexity as perplexity_module


def test_dense_scores_passed_in_are_not_recomputed(tmp_path, tiny_dir, monkeypatch):
    """A sweep passes the first run's dense scores to the next: no dense pass is run again, the pruned one is."""
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(f'{{"text": "Sentence {i} of a small corpus, with a few more words."}}' for i in range(300)))
    passes = []
    real = perplexity_module.perplexity
    monkeypatch.setattr(perplexity_module, "perplexity", lambda *a, **k: passes.append(k["desc"]) or real(*a, **k))

    def config(method):
        return RunConfig(model=str(tiny_dir), prune=PruneConfig(method=method, nsamples=2, seqlen=16),
                         calib=f"file:{text}", eval=f"file:{text}", eval_windows=2)

    first = pipeline.run(config("wanda"), progress=False)
    dense = pipeline.DenseScores(first.perplexity.dense, first.zero_shot_dense)
    second = pipeline.run(config("magnitude"), progress=False, dense=dense)
    assert passes == ["perplexity (dense)", "perplexity (pruned)", "perplexity (pruned)"]
    assert second.perplexity.dense == first.perplexity.dense
    assert second.perplexity.pruned != first.perplexity.pruned


def test_recovery_reports_the_sparsity_it_kept(tmp_path, tiny_dir):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(6000)))
    report = pipeline.run(RunConfig(model=str(tiny_dir), prune=PruneConfig(method="wanda", nsamples=2, seqlen=16),
                                    calib=f"file:{text}", eval=f"file:{text}", eval_windows=2, recover="lora",
                                    recovery=RecoverConfig(steps=2, batch=1, seqlen=16)), progress=False)
    assert report.recovery["achieved_sparsity"] == report.achieved_sparsity > 0.49
    assert None not in (report.perplexity.dense, report.perplexity.pruned, report.perplexity.recovered)


def test_layer_prune_distills_hidden_states_of_the_surviving_layers(tmp_path, tiny_dir):
    """--structure layers with --distill-hidden: the teacher keeps evenly spaced dense layers' outputs before the
    prune; recovery matches those whose layer survived, each by its dense index (removed ones are skipped)."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(6000)))
    report = pipeline.run(RunConfig(model=str(tiny_dir), prune=PruneConfig(structure="layers", sparsity=0.5,
                                                                           nsamples=2, seqlen=16),
                                    calib=f"file:{text}", eval=f"file:{text}", eval_windows=2, recover="distill",
                                    recovery=RecoverConfig(params="full", steps=2, batch=1, seqlen=16, distill_topk=8,
                                                           distill_hidden=1.0, distill_hidden_layers=8)),
                          progress=False)
    removed = report.structure.removed_layers
    n_dense = report.structure.units_before
    kept = [index for index in range(n_dense) if index not in removed]
    hidden = report.recovery["hidden"]
    assert removed and hidden["dense_layers"] == kept  # every layer was kept by the teacher, the survivors matched
    assert hidden["student_layers"] == list(range(len(kept)))
    assert report.perplexity.recovered is not None


def test_structured_schedule_removes_a_share_per_stage_and_recovers_between(tmp_path, tiny_dir):
    """--structure layers --schedule 0.34,0.67 on 3 layers: one layer per stage, a recovery after each; the record
    counts against the dense model and names removed layers by their dense index, each stage's record beside it.
    With --distill-hidden the teacher's layers are matched by dense index across both stages."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(6000)))
    report = pipeline.run(RunConfig(model=str(tiny_dir), schedule="0.34,0.67",
                                    prune=PruneConfig(structure="layers", sparsity=0.67, nsamples=2, seqlen=16),
                                    calib=f"file:{text}", eval=f"file:{text}", eval_windows=2, recover="distill",
                                    recovery=RecoverConfig(params="full", steps=4, batch=1, seqlen=16, distill_topk=8,
                                                           distill_hidden=1.0, distill_hidden_layers=3)),
                          progress=False)
    s = report.structure
    first, second = s.stages
    assert first.removed_layers and second.removed_layers and len(first.removed_layers) == 1
    survivors = [i for i in range(3) if i not in first.removed_layers]
    assert s.removed_layers == sorted(first.removed_layers + [survivors[second.removed_layers[0]]])
    assert (s.units_before, s.units_kept, s.sparsity) == (3, 1, 0.67)
    assert s.achieved_sparsity == pytest.approx(2 / 3)
    assert s.params_before == first.params_before and s.params_after == second.params_after
    assert s.config_changes == {"num_hidden_layers": 1}
    kept = [i for i in range(3) if i not in s.removed_layers]
    stages = report.recovery["schedule"]
    assert [stage["hidden"]["dense_layers"] for stage in stages] == [survivors, kept]
    assert [stage["hidden"]["student_layers"] for stage in stages] == [[0, 1], [0]]


def test_channel_schedule_reaches_the_dense_fraction(tmp_path, tiny_dir):
    """0.25 then 0.5 of 128 channels with --round-to 1: 96, then 64 (not 96 * 0.5 = 48)."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(6000)))
    report = pipeline.run(RunConfig(model=str(tiny_dir), schedule="0.25,0.5",
                                    prune=PruneConfig(structure="channels", sparsity=0.5, round_to=1, nsamples=2,
                                                      seqlen=16),
                                    calib=f"file:{text}", eval=f"file:{text}", eval_windows=2, recover="lm",
                                    recovery=RecoverConfig(params="full", steps=2, batch=1, seqlen=16)),
                          progress=False)
    s = report.structure
    assert [stage.units_kept for stage in s.stages] == [96, 64] and s.units_kept == 64
    assert s.achieved_sparsity == 0.5 and s.config_changes["intermediate_size"] == 64
    assert len(report.recovery["schedule"]) == 2
