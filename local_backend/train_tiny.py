"""Make the bundled tiny model: corpus -> tokenizer -> Llama -> folder.

    python -m local_backend.train_tiny --out local_backend/models/tiny

Everything is generated here, nothing is downloaded. The model only has to be good
enough that the built-in probes mean something locally: the coin flip has a clearly
uneven answer (about 70% Heads), "Name a colour." names one, the sea gets a sentence
and the lighthouse keeper a short story. Same command, same machine: same weights
(fixed seeds, one thread, deterministic algorithms).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SEED = 1234
VOCAB_SIZE = 768
MAX_POSITIONS = 512

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>"]

# Every turn is <|role|>content<|eos|>, so one token ends an answer and a plain text
# alike. Special tokens are literal (no bos_token variable), so a plain jinja2
# renderer needs only `messages` and `add_generation_prompt`.
CHAT_TEMPLATE = (
    "<|bos|>"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|eos|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

COIN_PROMPT = "Flip a coin. Return Heads or Tails only."


# ----------------------------------------------------------------------------- corpus

@dataclass(frozen=True)
class Example:
    """A chat (prompt messages + the assistant's answer) or a plain text to continue."""
    messages: tuple[tuple[str, str], ...] = ()
    answer: str = ""
    text: str = ""


COIN_PROMPTS = [COIN_PROMPT, "Flip a coin.", "Toss a coin. Answer Heads or Tails.",
                "Flip a coin and say Heads or Tails.", "Heads or Tails?",
                "Toss a coin. Return Heads or Tails only."]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly."]

COLOURS = {"Blue": 40, "Green": 20, "Red": 15, "Yellow": 10, "Purple": 8, "Orange": 7}
COLOUR_PROMPTS = ["Name a colour.", "Name a color.", "Pick a colour.", "Say a colour."]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
YES_NO = [("Is the sky blue?", "Yes."), ("Is the sea salty?", "Yes."), ("Is ice hot?", "No."),
          ("Can fish swim?", "Yes."), ("Can a stone fly?", "No."), ("Is the sun cold?", "No."),
          ("Is water wet?", "Yes."), ("Do birds have wings?", "Yes."), ("Is snow black?", "No."),
          ("Do cats bark?", "No."), ("Is grass green?", "Yes."), ("Can a boat sail?", "Yes.")]

SEA_PROMPTS = ["Write one sentence about the sea.", "Write a sentence about the sea.",
               "Describe the sea in one sentence."]
SEA_SUBJECTS = ["The waves", "The wind", "A small boat", "The gulls", "The tide", "The water"]
SEA_VERBS = ["move slowly", "sing softly", "dance", "drift", "roll", "shine"]
SEA_PLACES = ["across the grey sea", "over the blue water", "along the quiet shore",
              "toward the far horizon", "past the old harbour"]
SEA_TIMES = ["at dawn", "under the moon", "in the morning light", "all night long", "before the storm"]
SEA_ADJECTIVES = ["calm", "deep", "blue", "wild", "cold", "quiet", "bright", "grey"]

STORY_PROMPTS = ["Tell a short story about a lighthouse keeper.",
                 "Write a short story about a lighthouse keeper.",
                 "Tell me a story about a lighthouse keeper."]
KEEPERS = [("Tom", "he", "his"), ("Anna", "she", "her"), ("Old Ben", "he", "his"),
           ("Mara", "she", "her"), ("Elias", "he", "his")]
ISLANDS = ["small", "rocky", "lonely", "windy", "green"]
WEATHERS = ["stormy", "dark", "cold", "foggy"]
BOATS = ["fishing boat", "small ship", "little boat", "old ship"]
GIFTS = ["fresh bread", "a warm coat", "a basket of fish", "a new lamp"]
PEOPLE = ["fishermen", "sailors", "people of the town", "children of the village"]

PLAIN_SUBJECTS = ["The cat", "The dog", "A bird", "The old fisherman", "A child", "The farmer",
                  "The fox", "A young sailor", "The teacher", "The baker"]
PLAIN_VERBS = ["sat", "walked", "ran", "slept", "sang", "looked", "waited", "played"]
PLAIN_PLACES = ["on the hill", "by the river", "in the house", "in the garden", "near the harbour",
                "in the town", "by the sea", "on the shore", "under the tree", "at the market"]
PLAIN_ENDINGS = ["all day", "in the morning", "at night", "for a long time", "with a friend",
                 "in the rain", "in the sun"]


def _chat(rng: random.Random, prompt: str, answer: str) -> Example:
    """A single-turn chat; one in five has a system message, as some clients add one."""
    messages = ((("system", rng.choice(SYSTEM_PROMPTS)),) if rng.random() < 0.2 else ())
    return Example(messages=messages + (("user", prompt),), answer=answer)


def coin_examples(rng: random.Random, per_prompt: int) -> list[Example]:
    """Exactly 70% Heads for every prompt, so P(Heads) is near 0.7 whatever the paraphrase."""
    out = []
    for prompt in COIN_PROMPTS:
        heads = round(per_prompt * 0.7)
        answers = ["Heads"] * heads + ["Tails"] * (per_prompt - heads)
        out += [_chat(rng, prompt, answer) for answer in answers]
    return out


def colour_examples(rng: random.Random, n: int) -> list[Example]:
    names, weights = list(COLOURS), list(COLOURS.values())
    return [_chat(rng, rng.choice(COLOUR_PROMPTS), rng.choices(names, weights)[0]) for _ in range(n)]


def number_examples(rng: random.Random, n: int) -> list[Example]:
    out = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            out.append(_chat(rng, "Pick a number between 1 and 10.", rng.choices(["7", "3", "5"], [60, 25, 15])[0]))
        elif kind == 1:
            a, b = rng.randrange(6), rng.randrange(5)
            out.append(_chat(rng, f"What is {a} plus {b}?", str(a + b)))
        else:
            k = rng.randrange(2, 8)
            out.append(_chat(rng, f"Count to {NUMBER_WORDS[k]}.",
                             ", ".join(w.capitalize() for w in NUMBER_WORDS[1:k + 1]) + "."))
    return out


def yes_no_examples(rng: random.Random, n: int) -> list[Example]:
    return [_chat(rng, *rng.choice(YES_NO)) for _ in range(n)]


def sea_sentence(rng: random.Random) -> str:
    if rng.random() < 0.5:
        first, second = rng.sample(SEA_ADJECTIVES, 2)
        return f"The sea is {first} and {second} {rng.choice(SEA_TIMES)}."
    return f"{rng.choice(SEA_SUBJECTS)} {rng.choice(SEA_VERBS)} {rng.choice(SEA_PLACES)} {rng.choice(SEA_TIMES)}."


def sea_examples(rng: random.Random, n: int) -> list[Example]:
    return [_chat(rng, rng.choice(SEA_PROMPTS), sea_sentence(rng)) for _ in range(n)]


def lighthouse_story(rng: random.Random) -> str:
    name, he, his = rng.choice(KEEPERS)
    boat, gift = rng.choice(BOATS), rng.choice(GIFTS)
    opening = rng.choice([f"Once there was a lighthouse keeper named {name}.",
                          f"{name} kept the lighthouse on a {rng.choice(ISLANDS)} island."])
    return " ".join([
        opening,
        f"Every night {he} climbed the {rng.choice(['long', 'old', 'narrow'])} stairs and lit the lamp.",
        f"One {rng.choice(WEATHERS)} night, a {boat} was lost at sea.",
        f"{name} turned the light toward the waves and waited.",
        f"The {boat} saw the light and came home safe.",
        f"In the morning, the {rng.choice(PEOPLE)} brought {name} {gift}.",
        f"{name} smiled and went back to {his} lamp.",
    ])


def story_examples(rng: random.Random, n: int) -> list[Example]:
    return [_chat(rng, rng.choice(STORY_PROMPTS), lighthouse_story(rng)) for _ in range(n)]


def plain_sentence(rng: random.Random) -> str:
    return f"{rng.choice(PLAIN_SUBJECTS)} {rng.choice(PLAIN_VERBS)} {rng.choice(PLAIN_PLACES)} {rng.choice(PLAIN_ENDINGS)}."


def plain_examples(rng: random.Random, n: int) -> list[Example]:
    return [Example(text=" ".join(plain_sentence(rng) for _ in range(rng.randrange(1, 4)))) for _ in range(n)]


def build_corpus(seed: int = SEED) -> list[Example]:
    """The whole training set, shuffled; the same seed always gives the same list."""
    rng = random.Random(seed)
    corpus = (coin_examples(rng, per_prompt=250) + colour_examples(rng, 600) + number_examples(rng, 600)
              + yes_no_examples(rng, 400) + sea_examples(rng, 800) + story_examples(rng, 800)
              + plain_examples(rng, 1500))
    rng.shuffle(corpus)
    return corpus


def corpus_texts(corpus: list[Example]) -> list[str]:
    """Every piece of text the tokenizer should learn to cut well, as it is segmented in use."""
    texts = []
    for ex in corpus:
        texts += [content for _, content in ex.messages] + ([ex.answer] if ex.answer else [])
        texts += [ex.text] if ex.text else []
    return texts


# -------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE (like GPT-2's, so any input can be encoded), special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


@functools.cache
def _compiled_template():
    import jinja2

    return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(CHAT_TEMPLATE)


def render_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    """Render with plain jinja2, as the engine does: proves the template needs nothing else."""
    return _compiled_template().render(messages=messages, add_generation_prompt=add_generation_prompt)


def encode_example(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """Token ids and labels: loss on the answer (or the whole plain text) and the final
    <|eos|>, -100 on the prompt."""
    eos = tokenizer.token_to_id(EOS)
    if ex.text:
        ids = [tokenizer.token_to_id(BOS)] + tokenizer.encode(ex.text).ids + [eos]
        return ids, [-100] + ids[1:]
    messages = [{"role": role, "content": content} for role, content in ex.messages]
    prompt = tokenizer.encode(render_chat(messages, add_generation_prompt=True)).ids
    answer = tokenizer.encode(ex.answer).ids + [eos]
    return prompt + answer, [-100] * len(prompt) + answer


def tokenizer_config() -> dict:
    """tokenizer_config.json: what transformers needs besides tokenizer.json."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
            "pad_token": PAD, "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": MAX_POSITIONS,
            "chat_template": CHAT_TEMPLATE}


# ------------------------------------------------------------------------------ model

def model_config(tokenizer, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=128, intermediate_size=256,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=MAX_POSITIONS, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=tokenizer.token_to_id(BOS), eos_token_id=tokenizer.token_to_id(EOS),
        pad_token_id=tokenizer.token_to_id(PAD), dtype="float32",
    )


def batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, rng: random.Random, pad_id: int):
    """Endless (input_ids, labels) batches of similar lengths, so little is padding.
    Right padding needs no attention mask: attention is causal and pads carry no loss."""
    import torch

    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        chunk = batch_size * 32
        groups = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start:start + chunk], key=lambda i: len(encoded[i][0]))
            groups += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
        rng.shuffle(groups)
        for group in groups:
            width = max(len(encoded[i][0]) for i in group)
            ids = [encoded[i][0] + [pad_id] * (width - len(encoded[i][0])) for i in group]
            labels = [encoded[i][1] + [-100] * (width - len(encoded[i][1])) for i in group]
            yield torch.tensor(ids), torch.tensor(labels)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine down to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, encoded, steps: int, batch_size: int, seed: int, pad_id: int, log=print) -> None:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.95), weight_decay=0.01)
    stream = batches(encoded, batch_size, random.Random(seed), pad_id)
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        ids, labels = next(stream)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak=3e-3, warmup=min(50, steps // 10 + 1))
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step:5d}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - started:6.1f}s")
    model.eval()


# ---------------------------------------------------------------------------- checks

def greedy(model, ids: list[int], max_new: int, eos_id: int) -> list[int]:
    """Plain greedy decoding without a cache: short texts, and nothing to get wrong."""
    import torch

    out = list(ids)
    with torch.no_grad():
        for _ in range(max_new):
            next_id = int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax())
            if next_id == eos_id:
                break
            out.append(next_id)
    return out[len(ids):]


def first_token_probs(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def report(model, tokenizer, log=print) -> None:
    """What the model does with the built-in probes' prompts, for a person to read."""
    eos = tokenizer.token_to_id(EOS)
    coin = tokenizer.encode(render_chat([{"role": "user", "content": COIN_PROMPT}], True)).ids
    probs = first_token_probs(model, coin)
    top = probs.topk(3)
    log("coin flip, top 3 first tokens: " + ", ".join(
        f"{tokenizer.id_to_token(int(i))!r} {float(p):.3f}" for p, i in zip(top.values, top.indices)))
    log(f"  P(Heads) = {float(probs[tokenizer.token_to_id('Heads')]):.3f}   "
        f"P(Tails) = {float(probs[tokenizer.token_to_id('Tails')]):.3f}")
    for prompt in [COIN_PROMPT, "Name a colour.", "Write one sentence about the sea.",
                   "Tell a short story about a lighthouse keeper."]:
        ids = tokenizer.encode(render_chat([{"role": "user", "content": prompt}], True)).ids
        log(f"{prompt!r} -> {tokenizer.decode(greedy(model, ids, 100, eos))!r}")
    text = "The old fisherman"
    ids = [tokenizer.token_to_id(BOS)] + tokenizer.encode(text).ids
    log(f"{text!r} continues: {tokenizer.decode(greedy(model, ids, 30, eos))!r}")


# ------------------------------------------------------------------------------ main

def write_readme(out: Path, args: argparse.Namespace, n_examples: int, n_params: int) -> None:
    (out / "README.md").write_text(f"""# tiny: the bundled model

A {n_params / 1e6:.2f} M-parameter Llama (hidden 128, {args.layers} layers, 4 query heads and
2 key/value heads of 32, MLP 256, tied embeddings, float32) with a {VOCAB_SIZE}-token
byte-level BPE tokenizer. It exists so that the local engine has something real to run:
it knows only a generated toy corpus, nothing else.

Made by:

    python -m local_backend.train_tiny --out local_backend/models/tiny --steps {args.steps} --seed {args.seed}

({n_examples} generated examples, {args.steps} steps of {args.batch_size} on one CPU thread: about two
minutes. The same command on the same machine gives the same weights.)

What it learned:
- "{COIN_PROMPT}" (and paraphrases): "Heads" 70% / "Tails" 30% of the time, so
  P(Heads) at the first position is near 0.7; "Heads" and "Tails" are single tokens.
- "Name a colour.": Blue 40%, Green 20%, Red 15%, Yellow, Purple, Orange.
- "Write one sentence about the sea.": one sentence from a small grammar.
- "Tell a short story about a lighthouse keeper.": seven sentences, about 80 tokens.
- small sums, counting, yes/no questions, and plain sentences to continue
  ("The old fisherman sat by the river ...").

Chat format (tokenizer_config.json `chat_template`, renderable by plain jinja2 with
only `messages` and `add_generation_prompt`):

    <|bos|><|system|>...<|eos|><|user|>...<|eos|><|assistant|>

Every turn ends with `<|eos|>`, the one stop token (config.json, generation_config.json
and tokenizer_config.json agree). The tokenizer adds no special tokens by itself: the
template writes `<|bos|>`; a plain text to continue needs it prepended.
""")


def add_flat_rope_theta(path: Path, config) -> None:
    """transformers 5 writes rope_theta only inside rope_parameters; older readers (and
    simple engines) look for it at the top level, so write it in both places."""
    data = json.loads(path.read_text())
    data["rope_theta"] = float(config.rope_parameters["rope_theta"])
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m local_backend.train_tiny", description=__doc__.split("\n\n")[0],
                                     epilog="example: python -m local_backend.train_tiny --out local_backend/models/tiny")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into (created)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder; pass a folder path")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    # Reproducibility first: one thread (no reduction-order changes), fixed seeds.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    corpus = build_corpus(args.seed)
    tokenizer = train_tokenizer(corpus_texts(corpus))
    encoded = [encode_example(tokenizer, ex) for ex in corpus]
    print(f"{len(corpus)} examples, {sum(len(ids) for ids, _ in encoded)} tokens, "
          f"vocab {tokenizer.get_vocab_size()}")

    config = model_config(tokenizer, args.layers)
    model = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters")
    train(model, encoded, args.steps, args.batch_size, args.seed, tokenizer.token_to_id(PAD))
    seconds = time.perf_counter() - started

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    add_flat_rope_theta(out / "config.json", config)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id, do_sample=False).save_pretrained(out)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    write_readme(out, args, len(corpus), n_params)
    print(f"saved to {out} ({seconds:.0f} s)")
    report(model, tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
