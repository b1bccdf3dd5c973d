"""Downstream scoring: task parsing, lm-eval's request conventions, and agreement with lm-evaluation-harness."""
import json
import os
import subprocess
import sys

import pytest
import torch

from serve.downstream import ClozeItem, MultipleChoiceItem, encode_pair, evaluate_downstream, evaluate_items, read_task, score_requests
from serve.evaluation import EvalError, load_model
from train.data import load_tokenizer

from conftest import EVAL_DIR, require

AGREEMENT_ITEMS = 40


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_read_task_formats_and_errors(tmp_path):
    mc = read_task(write_lines(tmp_path / "mc.jsonl", [{"query": "Q", "choices": ["a", "b"], "gold": 1}] * 3), limit=2)
    assert mc == [MultipleChoiceItem("Q", ("a", "b"), 1)] * 2
    cloze = read_task(write_lines(tmp_path / "cz.jsonl", [{"context": "c", "continuation": "w", "target_delimiter": ""}]))
    assert cloze == [ClozeItem("c", "w", "")]
    for bad, message in [({"query": "Q", "choices": ["a", "b"], "gold": 2}, "gold"),
                         ({"query": "Q", "choices": ["a"], "gold": 0}, "at least two"),
                         ({"prompt": "Q"}, "expected keys")]:
        with pytest.raises(EvalError, match=message):
            read_task(write_lines(tmp_path / "bad.jsonl", [bad]))
    (tmp_path / "broken.jsonl").write_text('{"query": \n')
    with pytest.raises(EvalError, match="broken.jsonl:1: not JSON"):
        read_task(tmp_path / "broken.jsonl")
    with pytest.raises(EvalError, match="does not exist"):
        read_task(tmp_path / "absent.jsonl")


def test_encode_pair_moves_trailing_space_and_prepends_bos(tiny_members):
    tok = load_tokenizer(tiny_members[0])
    context, continuation = encode_pair(tok, "The cat sat on the ", "mat")
    assert context[0] == tok.bos_token_id
    assert context + continuation == tok.encode("The cat sat on the mat")
    assert tok.decode(continuation) == " mat"


def test_long_context_is_cut_from_the_left(tiny_members):
    """A context longer than the model's positions scores as its last max_length tokens do (lm-eval's rule)."""
    model, tok = load_model([tiny_members[0]]), load_tokenizer(tiny_members[0])
    max_length = model.config.max_position_embeddings
    long_context = "The history of the city begins with a small river crossing. " * 60
    (scored,) = score_requests(model, tok, [(long_context, " The river")], progress=False)
    ctx, cont = encode_pair(tok, long_context, " The river")
    assert len(ctx) + len(cont) > max_length + 1
    window = torch.tensor([(ctx + cont)[-(max_length + 1):]])
    log_probs = model.log_probs(window[:, :-1])[0, -len(cont):]
    expected = float(log_probs.gather(-1, torch.tensor(cont).unsqueeze(-1)).sum())
    assert scored[0] == pytest.approx(expected, rel=1e-5)


def test_too_long_choice_is_skipped_and_counted(tiny_members, tmp_path):
    model, tok = load_model([tiny_members[0]]), load_tokenizer(tiny_members[0])
    items = [MultipleChoiceItem("Question: which is longer?", ("short", "word " * 300), 0),
             MultipleChoiceItem("The sky is", ("blue", "a cat"), 0)]
    result = evaluate_items(model, tok, items, progress=False)
    assert result["items"] == 1 and result["skipped"] == 1
    with pytest.raises(EvalError, match="none of the 1 items"):
        evaluate_items(model, tok, items[:1], progress=False)


def _lm_eval_task_yaml(name: str, data_file, cloze: bool) -> str:
    common = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_file}\n"
              "test_split: test\n")
    if cloze:  # as lm-eval's lambada_openai: loglikelihood of " " + the last word, acc = greedy match
        return common + ("output_type: loglikelihood\ndoc_to_text: context\ndoc_to_target: \"{{' ' + continuation}}\"\n"
                         "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
                         "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return common + ("output_type: multiple_choice\ndoc_to_text: query\ndoc_to_choice: choices\ndoc_to_target: gold\n"
                     "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def _fits_window(tok, line: str, max_length: int) -> bool:
    record = json.loads(line)
    pairs = ([(record["query"], " " + c) for c in record["choices"]] if "choices" in record
             else [(record["context"], " " + record["continuation"])])
    return all(len(encode_pair(tok, c, x)[1]) <= max_length for c, x in pairs)


AGREEMENT_TASKS = ("piqa", "boolq", "lambada_openai")  # two choices; passages cut from the left; a cloze


def first_items(eval_dir) -> dict[str, tuple[list[dict], bool]]:
    """The first items of PIQA, BoolQ and LAMBADA in an eval directory (generated_eval_dir's, or ../shared/data/eval):
    {name: (records, cloze)}."""
    return {name: ([json.loads(line) for line in (eval_dir / f"{name}.jsonl").read_text().splitlines()
                    [: 2 * AGREEMENT_ITEMS]], name.startswith("lambada"))
            for name in AGREEMENT_TASKS}


def write_agreement_tasks(root, tok, max_length: int, items: dict[str, tuple[list[dict], bool]]):
    """Task files and lm-eval task YAMLs for AGREEMENT_ITEMS items of each task.

    Items with a choice longer than the model's window are left out here: lm-eval cannot score them
    (it stops with an assertion) and bench skips and counts them (test_too_long_choice_is_skipped)."""
    tasks = {}
    for name, (records, cloze) in items.items():
        lines = [line for line in map(json.dumps, records) if _fits_window(tok, line, max_length)][:AGREEMENT_ITEMS]
        path = root / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        (root / f"chorus_{name}.yaml").write_text(_lm_eval_task_yaml(f"chorus_{name}", path, cloze))
        tasks[name] = path
    return root, tasks


@pytest.fixture(scope="module")
def generated_tasks(tiny_members, generated_eval_dir, tmp_path_factory):
    """Agreement tasks from the generated eval directory (the held-out generated text): every clone has them."""
    tok = load_tokenizer(tiny_members[0])
    max_length = json.loads((tiny_members[0] / "config.json").read_text())["max_position_embeddings"]
    root, tasks = write_agreement_tasks(tmp_path_factory.mktemp("generated_tasks"), tok, max_length,
                                        first_items(generated_eval_dir))
    long_contexts = [len(encode_pair(tok, item.query, " no")[0]) > max_length for item in read_task(tasks["boolq"])]
    assert sum(long_contexts) >= AGREEMENT_ITEMS // 2  # most passages are cut from the left, as BoolQ's are
    return root, tasks


@pytest.fixture(scope="module", params=["generated", pytest.param("shared", marks=pytest.mark.shared_data)])
def agreement_tasks(request, tiny_members, tmp_path_factory):
    """The generated tasks (core), and the real PIQA, BoolQ and LAMBADA items where ../shared/data has them."""
    if request.param == "generated":
        return request.getfixturevalue("generated_tasks")
    tok = load_tokenizer(tiny_members[0])
    max_length = json.loads((tiny_members[0] / "config.json").read_text())["max_position_embeddings"]
    return write_agreement_tasks(tmp_path_factory.mktemp("shared_tasks"), tok, max_length,
                                 first_items(require(EVAL_DIR)))


def our_log_likelihoods(model_dir, task_file) -> list[list[float]]:
    """bench's log-likelihood of every request of every item, in lm-eval's order (items, then choices)."""
    model, tok = load_model([model_dir]), load_tokenizer(model_dir)
    items = read_task(task_file)
    if isinstance(items[0], ClozeItem):
        requests = [[(i.context, i.target_delimiter + i.continuation)] for i in items]
    else:
        requests = [[(i.query, i.target_delimiter + c) for c in i.choices] for i in items]
    flat = iter(score_requests(model, tok, [r for rs in requests for r in rs], progress=False))
    return [[next(flat)[0] for _ in rs] for rs in requests]


def max_ll_difference(ours: list[list[float]], theirs: list[list[float]]) -> float:
    assert [len(x) for x in ours] == [len(x) for x in theirs]  # same items, same number of choices each
    return max(abs(a - b) for xs, ys in zip(ours, theirs) for a, b in zip(xs, ys))


LL_TOLERANCE = 1e-3  # per request, a sum of fp32 log-probs over the continuation's tokens


def test_agrees_with_lm_evaluation_harness(tiny_members, agreement_tasks, tmp_path):
    """lm-eval's own HF model and task runner on the same items: identical accuracy, the same log-likelihood for
    every request. Negative control: another member's log-likelihoods differ from lm-eval's by more than the
    tolerance."""
    root, tasks = agreement_tasks
    ours = evaluate_downstream([tiny_members[0]], list(tasks.values()), batch_size=32, progress=False)
    script = (
        "import json, sys\n"
        "from lm_eval import simple_evaluate\n"
        "from lm_eval.tasks import TaskManager\n"
        f"out = simple_evaluate(model='hf', model_args=dict(pretrained={str(tiny_members[0])!r}, dtype='float32', "
        "device='cpu', add_bos_token=True), "
        f"tasks={[f'chorus_{n}' for n in tasks]!r}, task_manager=TaskManager(include_path={str(root)!r}), "
        "batch_size=16, log_samples=True)\n"
        "res = {t: {k.split(',')[0]: v for k, v in r.items() if isinstance(v, (int, float))} for t, r in out['results'].items()}\n"
        "lls = {t: [[float(x[0]) for x in s['filtered_resps']] for s in sorted(ss, key=lambda s: s['doc_id'])] "
        "for t, ss in out['samples'].items()}\n"
        "print(json.dumps({'results': res, 'lls': lls}))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"),
               TOKENIZERS_PARALLELISM="false")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    for name, path in tasks.items():
        ref = theirs["results"][f"chorus_{name}"]
        assert ours[name]["items"] == AGREEMENT_ITEMS
        assert ours[name]["acc"] == ref["acc"], name
        if "acc_norm" in ref:
            assert ours[name]["acc_norm"] == ref["acc_norm"], name
        else:
            assert ours[name]["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-4), name
        their_lls = theirs["lls"][f"chorus_{name}"]
        worst = max_ll_difference(our_log_likelihoods(tiny_members[0], path), their_lls)
        other = max_ll_difference(our_log_likelihoods(tiny_members[1], path), their_lls)
        print(f"{name}: max |ll ours - ll lm-eval| {worst:.2e}; member 1 vs lm-eval's member 0 {other:.2e}")
        assert worst <= LL_TOLERANCE, name
        assert other > LL_TOLERANCE, name  # the control: the comparison sees another model


def test_cli_downstream_and_bad_task(tiny_members, generated_tasks, tmp_path):
    _, tasks = generated_tasks
    ok = subprocess.run([sys.executable, "-m", "bench", "downstream", "--model", str(tiny_members[0]),
                         "--task", str(tasks["piqa"]), "--limit", "10"], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    record = json.loads(ok.stdout.strip().splitlines()[-1])
    in_process = evaluate_downstream([tiny_members[0]], [tasks["piqa"]], limit=10, progress=False)["piqa"]
    assert record["task"] == "piqa" and record["items"] == 10 and record["acc"] == in_process["acc"]
    bad = write_lines(tmp_path / "bad.jsonl", [{"query": "Q", "choices": ["a", "b"], "gold": 5}])
    run = subprocess.run([sys.executable, "-m", "bench", "downstream", "--model", str(tiny_members[0]),
                          "--task", str(bad)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "bad.jsonl:1" in run.stderr
