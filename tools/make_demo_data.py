"""Write the bundled demo preference data: flux_jax/assets/demo_preferences.jsonl (train) and
flux_jax/assets/demo_eval_preferences.jsonl (held out).

The pairs are templated so that a tiny model can learn the preference quickly: every chosen answer
is polite, complete and on topic; every rejected answer is curt, sloppy or off topic and uses words
that never appear in a chosen answer ("dunno", "whatever", "lol", "meh", "ugh"). Prompt plus answer
stays short (well under 64 tokens with `flux_jax.tiny_tokenizer`).

The output is a pure function of --seed: running this script again rewrites identical files.

    python tools/make_demo_data.py              # rewrite both asset files
    python tools/make_demo_data.py --pairs 50000 --out /tmp/big.jsonl   # a larger file (bench)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "flux_jax" / "assets"

# (question, complete on-topic answer). The answer is one sentence so pairs stay short.
FACTS: tuple[tuple[str, str], ...] = (
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "A week has seven days."),
    ("What do bees make?", "Bees make honey from the nectar of flowers."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the largest planet?", "Jupiter is the largest planet in our solar system."),
    ("Why do we need sleep?", "Sleep lets the body rest and helps the brain store memories."),
    (
        "What is the boiling point of water?",
        "Water boils at one hundred degrees Celsius at sea level.",
    ),
    ("What do plants need to grow?", "Plants need light, water and air to grow."),
    ("How many hours are in a day?", "A day has twenty four hours."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which animal is known as man's best friend?", "The dog is known as man's best friend."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many continents are there?", "There are seven continents on Earth."),
    ("What gas do we breathe in?", "We breathe in oxygen from the air."),
    ("What is the freezing point of water?", "Water freezes at zero degrees Celsius."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("Where does the sun rise?", "The sun rises in the east."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("How many months are in a year?", "A year has twelve months."),
    ("What do cows drink?", "Cows drink water, not milk."),
    ("What is the main language of Brazil?", "The main language of Brazil is Portuguese."),
    ("What shape has three sides?", "A triangle has three sides."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("What do you call frozen water?", "Frozen water is called ice."),
    ("How many players are on a soccer team?", "A soccer team has eleven players on the field."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What planet do we live on?", "We live on the planet Earth."),
    ("What does a doctor do?", "A doctor helps sick people get well."),
    ("What is two plus two?", "Two plus two is four."),
    ("What is ten minus three?", "Ten minus three is seven."),
    ("What color are ripe bananas?", "Ripe bananas are yellow."),
    ("What do fish use to breathe?", "Fish use gills to breathe in water."),
    ("What is the tallest animal?", "The giraffe is the tallest animal."),
    ("Which season comes after winter?", "Spring comes after winter."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What do we call a baby cat?", "A baby cat is called a kitten."),
    ("How many sides does a square have?", "A square has four equal sides."),
    ("What instrument has black and white keys?", "The piano has black and white keys."),
    ("What is the moon?", "The moon is a rocky body that orbits the Earth."),
    ("Why do leaves fall in autumn?", "Trees drop their leaves in autumn to save water in winter."),
    ("What is a noun?", "A noun is a word that names a person, place or thing."),
    ("How do birds fly?", "Birds fly by flapping their wings to push against the air."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What do we use to write on paper?", "We use a pen or a pencil to write on paper."),
    ("What is the sun?", "The sun is a star at the center of our solar system."),
    ("How many minutes are in an hour?", "An hour has sixty minutes."),
    ("What do pandas eat?", "Pandas eat mostly bamboo."),
    ("What is rain?", "Rain is water that falls from clouds."),
)

# Prompts end with a newline so that prompt + answer reads as two lines when printed together.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "{q}\n",
    "Question: {q}\n",
    "Please answer: {q}\n",
    "Can you tell me this? {q}\n",
    "I have a question. {q}\n",
)

CHOSEN_TEMPLATES: tuple[str, ...] = (
    "Sure! {a} I hope this helps.",
    "Good question. {a}",
    "Happy to help. {a} Let me know if you want more.",
    "Thank you for asking. {a}",
    "Of course. {a} Have a nice day.",
)

# Each rejected style is sloppy, curt or off topic, and uses marker words no chosen answer has.
REJECTED_TEMPLATES: tuple[str, ...] = (
    "dunno. whatever.",
    "meh, {a_sloppy} lol",
    "ugh, why ask me? whatever.",
    "lol idk, pizza is better anyway.",
    "whatever, {a_sloppy}",
    "meh. ask someone else lol.",
    "dunno lol, i like trains.",
)


def sloppy(answer: str) -> str:
    """The answer lower-cased with punctuation dropped and the last word cut: incomplete and lax."""
    words = answer.lower().replace(",", "").replace(".", "").replace("'", "").split()
    return " ".join(words[:-1])


def all_combinations() -> list[tuple[int, int, int, int]]:
    """Every (fact, prompt template, chosen template, rejected template) index tuple, in order."""
    return [
        (f, p, c, r)
        for f in range(len(FACTS))
        for p in range(len(PROMPT_TEMPLATES))
        for c in range(len(CHOSEN_TEMPLATES))
        for r in range(len(REJECTED_TEMPLATES))
    ]


def make_pair(combo: tuple[int, int, int, int]) -> dict[str, str]:
    f, p, c, r = combo
    question, answer = FACTS[f]
    return {
        "prompt": PROMPT_TEMPLATES[p].format(q=question),
        "chosen": CHOSEN_TEMPLATES[c].format(a=answer),
        "rejected": REJECTED_TEMPLATES[r].format(a_sloppy=sloppy(answer)),
    }


def make_splits(
    num_train: int, num_eval: int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint train and eval pairs: eval pairs are combinations never seen in training."""
    rng = random.Random(seed)
    combos = all_combinations()
    rng.shuffle(combos)
    if num_train + num_eval > len(combos):
        raise ValueError(
            f"only {len(combos)} distinct pairs exist, asked for {num_train + num_eval}"
        )
    return (
        [make_pair(c) for c in combos[:num_train]],
        [make_pair(c) for c in combos[num_train : num_train + num_eval]],
    )


def write_jsonl(pairs: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")


def make_large(num_pairs: int, seed: int) -> list[dict[str, str]]:
    """Many pairs for benchmarks: combinations drawn with replacement."""
    rng = random.Random(seed)
    combos = all_combinations()
    return [make_pair(rng.choice(combos)) for _ in range(num_pairs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=300, help="number of training pairs")
    parser.add_argument("--eval", type=int, default=40, help="number of held-out pairs")
    parser.add_argument("--pairs", type=int, help="write this many pairs to --out instead")
    parser.add_argument("--out", type=Path, help="output file for --pairs")
    args = parser.parse_args()
    if args.pairs is not None:
        if args.out is None:
            parser.error("--pairs needs --out")
        write_jsonl(make_large(args.pairs, args.seed), args.out)
        print(f"wrote {args.pairs} pairs to {args.out}")
        return
    train, held_out = make_splits(args.train, args.eval, args.seed)
    write_jsonl(train, ASSETS / "demo_preferences.jsonl")
    write_jsonl(held_out, ASSETS / "demo_eval_preferences.jsonl")
    print(f"wrote {len(train)} train and {len(held_out)} eval pairs to {ASSETS}")


if __name__ == "__main__":
    main()
