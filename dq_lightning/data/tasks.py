"""What differs between the benchmarks: where the data lives, its columns, lengths, decoding and metric.

Column names are the Hub datasets' own, so a Hub copy and local `{split}.jsonl` files with the same columns
go through the same code. A dotted column (`translation.en`) reads a field of a nested record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dq_lightning.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    hub_path: str | None
    hub_config: str | None
    source_column: str
    target_column: str
    max_source_length: int
    max_target_length: int
    generation: dict = field(default_factory=dict)
    metric: str = "rougeL"  # main validation metric, logged as val/<metric>
    source_lang: str | None = None  # mBART language codes, used when the tokenizer has them
    target_lang: str | None = None

    @property
    def monitor(self) -> str:
        return f"val/{self.metric}"

    @property
    def is_translation(self) -> bool:
        return self.metric == "bleu"


# Paper-scale decoding follows the BART/DQ-BART settings (XSum: 6 beams, 11-62 tokens; CNN/DM: 4 beams,
# 56-142 tokens, length penalty 2.0); CPU-scale configs override beams and lengths in their YAML.
TASKS: dict[str, TaskSpec] = {
    "demo": TaskSpec("demo", None, None, "document", "summary", 256, 48,
                     dict(num_beams=4, max_length=48, min_length=4, no_repeat_ngram_size=3)),
    "xsum": TaskSpec("xsum", "EdinburghNLP/xsum", None, "document", "summary", 1024, 62,
                     dict(num_beams=6, max_length=62, min_length=11, no_repeat_ngram_size=3,
                          length_penalty=1.0)),
    "cnn_dailymail": TaskSpec("cnn_dailymail", "abisee/cnn_dailymail", "3.0.0", "article", "highlights",
                              1024, 142,
                              dict(num_beams=4, max_length=142, min_length=56, no_repeat_ngram_size=3,
                                   length_penalty=2.0)),
    "eli5": TaskSpec("eli5", "sentence-transformers/eli5", None, "question", "answer", 256, 256,
                     dict(num_beams=4, max_length=256, min_length=64, no_repeat_ngram_size=3,
                          length_penalty=1.0)),
    "wmt16_en_ro": TaskSpec("wmt16_en_ro", "wmt/wmt16", "ro-en", "translation.en", "translation.ro", 128, 128,
                            dict(num_beams=5, max_length=128), metric="bleu",
                            source_lang="en_XX", target_lang="ro_RO"),
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None
