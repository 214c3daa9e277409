"""An offline tokenizer: a small byte-level BPE trained at run time, with Qwen-style chat tokens.

Model hubs are unreachable on the project's machines, so tiny test and demo models get a tokenizer trained
in about a second from a built-in corpus. It follows Qwen2's conventions (``<|endoftext|>`` as pad and EOS,
``<|im_start|>`` / ``<|im_end|>`` around ChatML turns), so prompts, SFT targets and rollout stopping work the
same way for the tiny models as for a real Qwen2.5 checkpoint. Both HF transformers and vLLM load it from a
``save_pretrained`` folder.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from transformers import PreTrainedTokenizerFast

from qoq.data.domains import DOMAIN_INFO
from qoq.rl.rewards import RESPONSE_FORMAT

#: Qwen2-style special tokens: end-of-text (also pad and EOS) and the two ChatML turn markers.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

#: ChatML (system / user / assistant turns), as Qwen2.5-Instruct writes it, without a default system turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_ENGLISH = """\
The patient is a middle-aged adult referred for evaluation. Please look at the image and answer the question.
What is the most likely diagnosis? Which of the following findings are present in this study? Choose from the
options listed below and give every label that applies. The image shows the chest, the heart, the lungs, the
breast, the skin, the brain, the kidney, the retina and the tissue of the organ under the microscope.
There is no evidence of an acute abnormality. The findings are consistent with the diagnosis, and the
region of interest is marked in the lower left part of the image. The electrocardiogram was recorded with
eight leads over ten seconds. The volume is shown as a sequence of frames from top to bottom.
First I describe what I see, then I compare it with each option, and finally I give the answer.
You are a helpful clinical assistant. Think step by step about the question before you answer it.
"""

_FORMAT_EXAMPLE = (
    "<think>{reason}</think>\n```json\n"
    '[{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "{label}"}}]\n```\n'
    "The answer is \\boxed{{{answer}}}."
)


def builtin_corpus(seed: int = 0, examples: int = 200) -> list[str]:
    """The tokenizer's built-in training text.

    Args:
        seed: seed of the generated example responses (label choices and box coordinates).
        examples: number of generated responses in the response format.

    Returns:
        Lines of text: common English, the clinical label names of all nine domains, and example responses
        in the project's format (``<think>``, a ```` ```json ```` block of ``bbox_2d``/``label`` objects,
        ``\\boxed{}``).
    """
    rng = random.Random(seed)
    lines = _ENGLISH.splitlines()
    # the label names of the nine clinical domains (qoq.data.domains), so that they tokenize compactly
    label_sets = {info.title: info.labels for info in DOMAIN_INFO.values()}
    labels = sorted({label for words in label_sets.values() for label in words})
    # The prompt contract's instruction appears in every prompt: repeated so that BPE merges its words.
    lines += [RESPONSE_FORMAT] * 20
    for domain, words in label_sets.items():
        lines.append(f"Domain: {domain}. Options: " + ", ".join(words) + ".")
    for _ in range(examples):
        answer = rng.sample(labels, k=rng.choice((1, 1, 2)))
        x1, y1 = rng.randrange(0, 200), rng.randrange(0, 200)
        lines.append(
            _FORMAT_EXAMPLE.format(
                reason=rng.choice(_ENGLISH.split(". ")).strip(),
                x1=x1,
                y1=y1,
                x2=x1 + rng.randrange(8, 120),
                y2=y1 + rng.randrange(8, 120),
                label=answer[0],
                answer=", ".join(answer),
            )
        )
    return lines


def build_tokenizer(
    vocab_size: int = 512, extra_corpus: Sequence[str] = (), seed: int = 0
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with Qwen-style special tokens and a ChatML chat template.

    Deterministic for given arguments (about a second for 512 tokens). The vocabulary holds the 256 byte
    symbols, the special tokens and the learned merges; it can end up smaller than ``vocab_size`` when the
    corpus runs out of pairs to merge, so size a model's embedding table by ``len(tokenizer)``.

    Args:
        vocab_size: target vocabulary size (at least 256 bytes + 3 special tokens).
        extra_corpus: additional training text, e.g. a dataset's questions and answers.
        seed: seed of the generated example responses in the built-in corpus.

    Returns:
        A fast tokenizer with ``<|endoftext|>`` as pad and EOS, ``<|im_start|>`` / ``<|im_end|>`` as
        special tokens, and a ChatML ``chat_template`` (``add_generation_prompt`` supported).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size}: a byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*builtin_corpus(seed), *extra_corpus], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
