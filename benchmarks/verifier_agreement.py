r"""How often our verifier and Hugging Face's Math-Verify agree, and where they part.

Two sets. GSM8K's training split: each reference solution is scored as it is (ending in "#### N") and
rewritten to end in "So the answer is $\boxed{N}$.", against the gold that sdpg.py takes from it; every one
is a right answer. A MATH-style set of our own (MATH_STYLE below, written for this script): final answers
in the forms MATH golds and models use, each boxed at the end of a short completion, right and wrong ones,
with our hand label of whether a careful grader would accept it. Ours is called as sdpg.py calls it (math_reward),
Math-Verify through math_verify_reward below. Writes OUT/verifier_agreement.json and OUT/verifier_agreement.md.

    python benchmarks/verifier_agreement.py --gsm8k GSM8K_TRAIN.jsonl --out benchmarks/results
"""

import argparse
import collections
import importlib.metadata
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from verifiers import gsm8k_gold, math_reward  # noqa: E402

# Math-Verify (an optional package) reads LaTeX only inside maths delimiters, hence the gold in $...$, and bounds each
# parse and each comparison with a SIGALRM timeout, which works in the main thread only.
MATH_VERIFY_TIMEOUT_S = 2


def math_verify_reward(completion: str, gold: str) -> float:
    """Hugging Face's Math-Verify as a (completion, gold) -> 1.0 or 0.0 reward, as math_reward is ours."""
    import logging

    import math_verify
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its timeout warnings repeat the whole answer
    if not isinstance(completion, str) or not isinstance(gold, str):
        return 0.0
    gold_parsed = math_verify.parse(f"${gold}$", parsing_timeout=MATH_VERIFY_TIMEOUT_S)
    answer = math_verify.parse(completion, parsing_timeout=MATH_VERIFY_TIMEOUT_S)
    return float(math_verify.verify(gold_parsed, answer, timeout_seconds=MATH_VERIFY_TIMEOUT_S))  # gold first

MATRIX = r"\begin{pmatrix} 0 & 3 \\ 0 & -1 \end{pmatrix}"

# (final answer, gold, right?, kind, note). The answer is boxed at the end of a completion; one that holds
# \boxed itself is the whole completion. right: our hand label. note: "P: ..." where our verifier's answer
# differs from the label on purpose, by a policy rule of verifiers.py (the tests check there are no others).
MATH_STYLE = [
    ("42", "42", True, "number", ""), ("-7", "-7", True, "number", ""), ("+5", "5", True, "number", ""),
    ("007", "7", True, "number", ""), ("41", "42", False, "number", ""), ("-3", "3", False, "number", ""),
    (r"\frac{3}{4}", "0.75", True, "fraction", ""), (r"\dfrac{5}{2}", "2.5", True, "fraction", ""),
    (r"\frac{10}{4}", r"\frac{5}{2}", True, "fraction", ""), ("7/3", r"\frac{7}{3}", True, "fraction", ""),
    ("0.125", r"\frac{1}{8}", True, "fraction", ""), (r"\frac{-3}{4}", r"-\frac{3}{4}", True, "fraction", ""),
    ("1.50", "1.5", True, "fraction", ""), (r"\tfrac{1}{6}", r"\frac16", True, "fraction", ""),
    ("0.333", r"\frac{1}{3}", False, "fraction", ""), ("0.333333", r"\frac{1}{3}", False, "fraction", ""),
    ("0.6667", r"\frac{2}{3}", False, "fraction", ""), (r"\frac{4}{3}", r"\frac{3}{4}", False, "fraction", ""),
    (r"2\sqrt{3}", r"\sqrt{12}", True, "surd", ""), (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True, "surd", ""),
    (r"3\sqrt{2}", r"\sqrt{18}", True, "surd", ""), (r"5\sqrt{5}", r"\sqrt{125}", True, "surd", ""),
    (r"1+\sqrt{3}", r"\sqrt{3}+1", True, "surd", ""),
    (r"\frac{1+\sqrt{5}}{2}", r"\frac{\sqrt{5}+1}{2}", True, "surd", ""),
    (r"\sqrt{8}", r"2\sqrt{3}", False, "surd", ""), (r"2\sqrt{6}", r"\sqrt{12}", False, "surd", ""),
    (r"\sqrt[3]{2}", r"2^{\frac{1}{3}}", True, "surd", "P: only square roots are read"),
    (r"4\pi", r"4 \pi", True, "pi", ""), (r"\frac{\pi}{3}", r"\pi/3", True, "pi", ""),
    (r"\frac{3\pi}{4}", r"\frac{3}{4}\pi", True, "pi", ""), (r"\frac{\pi}{3}", r"\frac{\pi}{6}", False, "pi", ""),
    (r"\pi", "3.14159", False, "pi", ""), (r"2\pi r", r"2 r \pi", True, "pi", ""),
    ("2^{10}", "1024", True, "power", ""), (r"3^{-2}", r"\frac{1}{9}", True, "power", ""),
    ("2^{10}", "1000", False, "power", ""),
    (r"1.5 \times 10^{3}", "1500", True, "scientific", ""), ("3e5", "300000", True, "scientific", ""),
    ("1,000,000", "1000000", True, "thousands", ""), (r"11,\! 111,\! 100", "11111100", True, "thousands", ""),
    (r"1\,234", "1234", True, "thousands", ""), (r"12{,}500", "12500", True, "thousands", ""),
    ("1,2", "12", False, "thousands", ""), ("5, 125", "5125", False, "thousands", ""),
    (r"\$1,250", "1250", True, "units", ""), (r"25\%", "25", True, "units", ""), (r"30^\circ", "30", True, "units", ""),
    (r"12\text{ cm}", "12", True, "units", ""), (r"5\text{ inches}", "5", True, "units", ""),
    (r"18 \text{ dollars}", "18", True, "units", ""), (r"45^{\circ}", "135", False, "units", ""),
    (r"10\%", "0.1", True, "units", "P: a percent sign is dropped, so 10% is 10"),
    ("1 million", "1000000", True, "units", "P: scale words are not read"),
    ("1, 2, 3", r"\{1,2,3\}", True, "list", ""), ("3, 1, 2", "1, 2, 3", True, "list", ""),
    ("-2, 5", "5, -2", True, "list", ""), (r"1,\ 2", "1, 2", True, "list", ""), ("1 and 4", "1, 4", True, "list", ""),
    (r"\pm 3", "3, -3", True, "list", ""), (r"2 \pm \sqrt{3}", r"2+\sqrt{3}, 2-\sqrt{3}", True, "list", ""),
    (r"\{-1,\ 4\}", "4, -1", True, "list", ""), ("1, 2", "1, 2, 3", False, "list", ""),
    ("1, 2, 4", "1, 2, 3", False, "list", ""), (r"\pm 3", "3", False, "list", ""),
    (r"The roots are $\boxed{1}$, $\boxed{2}$ and $\boxed{3}$.", r"\{1,2,3\}", True, "list", ""),
    (r"So $x = \boxed{2}$ or $x = \boxed{-3}$.", "-3, 2", True, "list", ""),
    (r"The roots are $\boxed{1}$ and $\boxed{2}$.", r"\{1,2,3\}", False, "list", ""),
    ("(1, 2)", "(1,2)", True, "tuple", ""), (r"\left( \frac{1}{2}, 3 \right)", "(0.5, 3)", True, "tuple", ""),
    ("(1, 2, 3)", "(1,2,3)", True, "tuple", ""), ("(2, 1)", "(1,2)", False, "tuple", ""),
    ("(1, 2)", "(1, 2, 0)", False, "tuple", ""), ("(3, -4)", "(3, 4)", False, "tuple", ""),
    (r"[0, \infty)", r"[0,\infty)", True, "interval", ""), (r"(-\infty, 3]", r"(-\infty,3)", False, "interval", ""),
    ("(-2, 5)", "[-2, 5]", False, "interval", ""),
    (r"\left[ -1, \frac{1}{2} \right]", "[-1, 0.5]", True, "interval", ""),
    (r"(-\infty, -1) \cup (1, \infty)", r"(-\infty,-1)\cup(1,\infty)", True, "interval", ""),
    (r"(1, \infty) \cup (-\infty, -1)", r"(-\infty,-1)\cup(1,\infty)", True, "interval",
     "P: a union is compared as text"),
    (r"x \in [2, 5)", "[2, 5)", True, "interval", ""),
    (r"5 \leq x", r"x \geq 5", True, "relation", ""), (r"x \ge 5", r"x\geq 5", True, "relation", ""),
    ("-x > -1", "x < 1", True, "relation", ""), (r"x \neq 3", r"x \ne 3", True, "relation", ""),
    ("2x > 4", "x > 2", True, "relation", ""), (r"\frac{x}{3} < 2", "x < 6", True, "relation", ""),
    (r"t \leq -\frac{3}{2}", r"-2t \geq 3", True, "relation", ""), ("x > 0", r"x \geq 0", False, "relation", ""),
    ("x < 1", "x > 1", False, "relation", ""), (r"x \leq -2", "x < -2", False, "relation", ""),
    (r"y \geq 5", r"x \geq 5", False, "relation", ""), ("x^2 > 4", "x > 2", False, "relation", ""),
    ("x > 2", r"(2, \infty)", True, "relation", "P: a relation is not an interval"),
    (r"-3 \le x \le 3", "[-3, 3]", True, "relation", "P: a relation is not an interval"),
    (MATRIX, r"\begin{bmatrix} 0 & 3 \\ 0 & -1 \end{bmatrix}", True, "matrix", ""),
    (r"\begin{pmatrix} 0&3\\0&-1 \end{pmatrix}", MATRIX, True, "matrix", ""),
    (r"\begin{pmatrix} \frac{1}{3} \\ -\frac{2}{3} \end{pmatrix}", r"\begin{pmatrix} 1/3 \\ -2/3 \end{pmatrix}", True,
     "matrix", ""),
    (r"\begin{pmatrix} -1 \\ 2 \\ 4 \end{pmatrix}", r"\begin{pmatrix}-1\\2\\4\end{pmatrix}", True, "matrix", ""),
    (r"\begin{pmatrix} \sqrt{8} & 0 \\ 0 & 1 \end{pmatrix}", r"\begin{pmatrix} 2\sqrt{2} & 0 \\ 0 & 1 \end{pmatrix}",
     True, "matrix", ""),
    (r"\begin{pmatrix} 0 & 3 \\ 0 & 1 \end{pmatrix}", MATRIX, False, "matrix", ""),
    (r"\begin{pmatrix} 0 & 0 \\ 3 & -1 \end{pmatrix}", MATRIX, False, "matrix", ""),
    (r"\begin{pmatrix} 0 & 3 & 0 & -1 \end{pmatrix}", MATRIX, False, "matrix", ""),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", "(1, 2)", True, "matrix", "P: a matrix matches only a matrix"),
    (r"y = -\frac{1}{2}x + \frac{3}{4}", "2x + 4y - 3 = 0", True, "equation", ""),
    ("y = 2x + 1", "2x - y + 1 = 0", True, "equation", ""), ("x + y = 5", "y = 5 - x", True, "equation", ""),
    ("x^2 + y^2 = 25", "x^2 + y^2 - 25 = 0", True, "equation", ""),
    ("(x-1)^2 + (y+2)^2 = 9", "x^2 - 2x + y^2 + 4y - 4 = 0", True, "equation", ""),
    ("3x + 2y = 6", r"\frac{x}{2} + \frac{y}{3} = 1", True, "equation", ""),
    (r"y = -\frac{3}{2}x + 3", "3x + 2y = 6", True, "equation", ""),
    ("z = 2x - y", "2x - y - z = 0", True, "equation", ""), ("2x = 10", "x = 5", True, "equation", ""),
    ("y = 3x - 2", "y = 3x + 2", False, "equation", ""), ("y = x^2", "y = x^2 + 1", False, "equation", ""),
    ("0 = 0", "2x + 4y - 3 = 0", False, "equation", ""), ("2x + 4y - 3", "2x + 4y - 3 = 0", False, "equation", ""),
    ("x(x + y - 1) = 0", "x + y = 1", False, "equation", ""),
    ("x = 5", "5", True, "label", ""), ("|AB| = 1", "1", True, "label", ""),
    (r"AB = 2\sqrt{3}", r"\sqrt{12}", True, "label", ""),
    ("S_{ABC}:S = 7:32", "7:32", True, "label", ""), ("a_5 = 17", "17", True, "label", ""),
    ("k = -2", "-2", True, "label", ""), (r"\theta = 30^\circ", "30", True, "label", ""),
    ("f(x) = 2x + 1", "2x + 1", True, "label", ""), ("x = 3", "4", False, "label", ""),
    ("f(2) = 7", "7", True, "label", "P: only names are labels, f(2) is a value"),
    (r"m\angle A = 60^\circ", "60", True, "label", "P: only names are labels"),
    (r"\text{(B)}", "B", True, "text", ""), (r"\text{even}", "even", True, "text", ""),
    (r"\textbf{(C)}", "C", True, "text", ""), ("Tuesday", r"\text{Tuesday}", True, "text", ""),
    (r"\text{(A)}", "C", False, "text", ""), ("yes", "no", False, "text", ""),
    ("3x + 2", "2 + 3x", True, "expression", ""), ("(x+1)^2", "x^2 + 2x + 1", True, "expression", ""),
    ("x^2 - 1", "(x-1)(x+1)", True, "expression", ""), (r"\frac{x}{2}", "0.5x", True, "expression", ""),
    ("a^2 b", "b a^2", True, "expression", ""), (r"\frac{1}{x+1}", r"\frac{1}{1+x}", True, "expression", ""),
    ("2x", "2y", False, "expression", ""), ("x^2+1", "x^2-1", False, "expression", ""),
    ("6x^2 + 5x - 6", "(3x-2)(2x+3)", True, "expression", ""),
    ("(3x+2)(2x-3)", "(3x-2)(2x+3)", False, "expression", ""),
    ("3 + 4i", "4i + 3", True, "complex", ""), ("2i", "-2i", False, "complex", ""),
    ("i^2", "-1", True, "complex", "P: i is read as a name, not as the imaginary unit"),
    (r"\sin 30^\circ", r"\frac{1}{2}", True, "function", "P: functions are not evaluated"),
    (r"\log_2 8", "3", True, "function", "P: functions are not evaluated"),
    ("0", "x^2 - 4x - 2 = 0", False, "gaming", ""), ("5", "x = 5, y = 2", False, "gaming", ""),
    (r"\boxed{}", "0", False, "gaming", ""), ("AZYUK2A", "2", False, "gaming", ""),
    ("1 or 2 or 3 or 4 or 5", "3", False, "gaming", ""),
]

VERDICTS = {  # (ours, math-verify, hand label) of a disagreement -> who is right, and what went wrong
    (True, False, True): "Math-Verify misses a right answer", (True, False, False): "ours accepts a wrong answer",
    (False, True, True): "ours misses a right answer", (False, True, False): "Math-Verify accepts a wrong answer",
}


def completion_of(answer: str) -> str:
    return answer if "\\boxed" in answer else rf"We find that the answer is $\boxed{{{answer}}}$."


def gsm8k_completions(path: str) -> list[tuple[str, str, str]]:
    """(completion, gold, form) for each reference solution of a GSM8K file: as it is, and boxed."""
    out = []
    for line in open(path):
        answer = json.loads(line)["answer"]
        body, final = answer.rsplit("####", 1)
        out.append((answer, gsm8k_gold(answer), "#### N"))
        out.append((body + rf"So the answer is $\boxed{{{final.strip()}}}$.", gsm8k_gold(answer), "boxed"))
    return out


def score(items, ours, theirs) -> list[dict]:
    rows = []
    for completion, gold, *rest in items:
        rows.append({"completion": completion, "gold": gold, "ours": ours(completion, gold) == 1.0,
                     "math_verify": theirs(completion, gold) == 1.0, "rest": rest})
    return rows


def summary(rows: list[dict]) -> dict:
    both = collections.Counter((r["ours"], r["math_verify"]) for r in rows)
    return {"cases": len(rows), "agree": both[True, True] + both[False, False], "both_accept": both[True, True],
            "both_refuse": both[False, False], "only_ours": both[True, False], "only_math_verify": both[False, True]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gsm8k", required=True, help="GSM8K's train.jsonl (fields question, answer)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="folder for the results")
    a = p.parse_args()
    ours, theirs = math_reward, math_verify_reward
    t0 = time.time()
    gsm8k = score(gsm8k_completions(a.gsm8k), ours, theirs)
    math_style = score([(completion_of(ans), gold, right, kind, note) for ans, gold, right, kind, note in MATH_STYLE],
                       ours, theirs)
    for r in math_style:
        r["right"], r["kind"], r["note"] = r.pop("rest")
    for r in gsm8k:
        (r["form"],) = r.pop("rest")
    seconds = time.time() - t0
    version = importlib.metadata.version("math-verify")
    result = {"math_verify_version": version, "seconds": round(seconds, 1), "gsm8k_train": summary(gsm8k),
              "math_style": summary(math_style),
              "math_style_right": {"ours": sum(r["ours"] == r["right"] for r in math_style),
                                   "math_verify": sum(r["math_verify"] == r["right"] for r in math_style)},
              "gsm8k_disagreements": [r for r in gsm8k if r["ours"] != r["math_verify"]],
              "math_style_cases": math_style}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "verifier_agreement.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(a.out, "verifier_agreement.md"), "w") as f:
        f.write(report(result))
    print(report(result))


def gsm8k_kind(completion: str) -> str:
    """Why a verifier missed a right GSM8K solution; the one cause met so far is named, others are 'other'."""
    if re.search("answer", completion.rsplit("####", 1)[0], re.IGNORECASE):
        return "the solution says 'answer' (often 'answered') before its end, and an earlier number is taken"
    return "other"


def cell(text: str) -> str:
    """Code in a Markdown table cell: its '|' escaped."""
    return "`" + text.replace("|", "\\|") + "`"


def report(result: dict) -> str:
    g, m, right = result["gsm8k_train"], result["math_style"], result["math_style_right"]
    lines = [
        "# Our verifier and Math-Verify: agreement", "",
        f"`python benchmarks/verifier_agreement.py --gsm8k GSM8K_TRAIN.jsonl` (math-verify "
        f"{result['math_verify_version']}, ours as sdpg.py calls it, Math-Verify through `math_verify_reward`; "
        f"{result['seconds']} s).", "",
        "| set | cases | agree | both accept | both refuse | only ours accepts | only Math-Verify accepts |",
        "|---|---|---|---|---|---|---|"]
    for name, s in (("GSM8K train, reference solutions (#### N and boxed)", g), ("MATH-style, our own cases", m)):
        lines.append(f"| {name} | {s['cases']} | {s['agree']} ({100 * s['agree'] / s['cases']:.1f}%) | "
                     f"{s['both_accept']} | {s['both_refuse']} | {s['only_ours']} | {s['only_math_verify']} |")
    lines += ["", f"Against our hand labels of the MATH-style set: ours {right['ours']}/{m['cases']}, "
              f"Math-Verify {right['math_verify']}/{m['cases']} right. The set was written by the authors of "
              "verifiers.py, so it leans towards the forms their rules know: read it as a map of where the two "
              "differ, not as an accuracy.", "", "## GSM8K disagreements", ""]
    kinds = collections.Counter((r["form"], r["ours"], gsm8k_kind(r["completion"]))
                                for r in result["gsm8k_disagreements"])
    lines += [f"- {form}, only {'ours' if mine else 'Math-Verify'} accepts, {kind}: {n}"
              for (form, mine, kind), n in sorted(kinds.items())] or ["None."]
    for r in result["gsm8k_disagreements"][:5]:
        lines.append(f"  - gold `{r['gold']}`, ends `{r['completion'][-70:]!r}`")
    lines += ["", "## MATH-style disagreements, by who is right (our hand label)", "",
              "| verdict | kind | answer | gold | note |", "|---|---|---|---|---|"]
    cases = [r for r in result["math_style_cases"] if r["ours"] != r["math_verify"]]
    for r in sorted(cases, key=lambda r: (VERDICTS[r["ours"], r["math_verify"], r["right"]], r["kind"])):
        answer = r["completion"].removeprefix(r"We find that the answer is $\boxed{").removesuffix("}$.")
        lines.append(f"| {VERDICTS[r['ours'], r['math_verify'], r['right']]} | {r['kind']} | {cell(answer)} | "
                     f"{cell(r['gold'])} | {r['note']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
