"""Trivial baselines (`python -m dq_lightning baseline`): what each writes, and the table beside a teacher."""

from __future__ import annotations

import json

from dq_lightning.baselines import CONSTANT_CANDIDATES, baseline_outputs, constant_output
from tests.conftest import run_cli, write_jsonl


def test_lead_and_copy_take_the_first_sentences_or_the_source():
    source = "The cat sat down. It was tired. Then it slept. The end."
    assert baseline_outputs("cnn_dailymail", [source], "lead-1") == ["The cat sat down."]
    assert baseline_outputs("cnn_dailymail", [source], "lead-3") == ["The cat sat down. It was tired. Then it slept."]
    assert baseline_outputs("eli5", [source], "copy") == [source]


def test_the_constant_answer_is_the_candidate_most_like_the_later_training_answers():
    typical = "the water gets hot and the air moves up because it is lighter"
    candidates = ["bananas are yellow fruit", typical, "my phone runs out of battery"]
    candidates += [f"unrelated words number {i}" for i in range(CONSTANT_CANDIDATES - len(candidates))]
    judges = ["hot air moves up because it is lighter than the cold air",
              "the water gets hot and then it moves up", "because it is lighter the air goes up"]
    assert constant_output(candidates + judges) == typical
    assert baseline_outputs("eli5", ["q1", "q2"], "constant", typical) == [typical, typical]


def test_eli5_table_has_the_constant_answer_and_judges_the_teacher(tmp_path):
    answers = [f"because the {word} is warm and the light comes in through the window" for word in
               ("sun", "room", "day", "sky")] * 40
    for split, count in (("train", 160), ("validation", 6), ("test", 6)):
        write_jsonl(tmp_path / "eli5" / f"{split}.jsonl",
                    [{"id": str(i), "question": f"why is question {i} asked?", "question_ctx": "",
                      "answer": answers[i]} for i in range(count)])
    run = tmp_path / "run"
    run.mkdir()
    (run / "fit_metrics.json").write_text(json.dumps({"metrics": {"val/rougeL": 1.0, "val/distinct": 100.0}}))
    result = run_cli("baseline", "--task", "eli5", "--data-dir", str(tmp_path / "eli5"), "--run", str(run))
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:] if line.strip()}
    assert {"teacher", "lead-1", "copy", "constant"} <= set(rows)
    assert float(rows["constant"][2]) > float(rows["copy"][2])  # rougeL: the typical answer beats the question
    assert "does NOT beat" in result.stdout
