"""pipeline.run as a sweep uses it, and its phases' contracts."""

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
    removed = report.structure["removed_layers"]
    n_dense = report.structure["units_before"]
    kept = [index for index in range(n_dense) if index not in removed]
    hidden = report.recovery["hidden"]
    assert removed and hidden["dense_layers"] == kept  # every layer was kept by the teacher, the survivors matched
    assert hidden["student_layers"] == list(range(len(kept)))
    assert report.perplexity.recovered is not None
