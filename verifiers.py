r"""Answer extraction and equivalence for maths rewards, in plain Python.

SDPG's only ground truth is the verifier. A reward that is wrong a few percent
of the time teaches the policy the verifier's bugs, and the positive-advantage
gate then distils from exactly those rollouts. So this module is deliberately
conservative: when in doubt, an answer does *not* match.

Public functions: extract_answer(text), is_equiv(pred, gold),
math_reward(completion, gold) -> 1.0 or 0.0, and gsm8k_gold(answer_field).

Extraction order (first rule that finds something wins). A completion that runs on into a
"Question:" (or "Problem:", "Q:") line of its own is first cut there.
    1. the last complete ``\boxed{...}`` or ``\fbox{...}`` (balanced braces;
       ``\{`` and ``\}`` are literal braces; empty boxes and a box whose
       closing brace never comes are skipped);
    2. the last GSM8K ``#### X`` (X is the rest of that line);
    3. the last ``answer is X`` or ``answer: X`` (case-insensitive, so "The
       final answer is X" counts); X runs to the end of the sentence or line.
       When X's only number ends it and its ``$...$`` hold no digits, that
       number is taken ("The largest $n$ is 34." -> 34); else X whole;
    4. the last ``$...$`` when the last number lies inside it (``$\frac{10}{9}$``);
    5. the last number that stands on its own (no letter or digit touching it:
       ``AZYUK2A`` and ``25cm`` hold none), with sign, decimals and ``a/b``.
Pass the *completion only*: given the prompt as well, rules 2-5 could pick up
the prompt's own example answer.
Several boxes: the last box alone is the answer; when the gold is a list of n
items, the last n boxes together may also match it (``\boxed{-2} and \boxed{1}``).

Equivalence rules (P marks a policy choice; the rest is mathematics)
    * Numbers are exact rationals (``fractions.Fraction``) compared exactly, with
      no tolerance (P): ``0.5 == 1/2 == \frac{1}{2}`` but ``0.333 != 1/3``; big
      integers are exact; ``1e3`` and ``1.5\times10^{3}`` are rationals too.
    * A comma is a thousands separator only in an unbroken digit string with
      groups of exactly three after a non-zero lead (``1,000``, ``14{,}916``,
      and ``11,\! 111,\! 100``: spaces after ``,\!`` do not break it); anywhere
      else it separates items: ``5, 125`` and ``0,111`` are lists (P).
    * Percent signs, currency, units and degrees are dropped (P): ``50% == 50``,
      ``$18 == 18 dollars``, ``90^\circ == 90``; scale words ("million") and ``i``
      are not units.
    * An equation loses its left side only when that side is a label (``x``,
      ``a_3``, ``f(x)``, ``\theta``, ``(x, y)``, ``\text{r}``, ``AB``, ``|AB|``,
      ``A:B``, ``S_{ABC}:S``; not ``|x|`` or ``xy``, which have values); ``x \in S``
      is S. Otherwise the equation is kept whole, so ``0`` never matches
      ``x^2 - 4x - 2 = 0`` (P).
    * Two equations match when lhs - rhs of one is a nonzero constant multiple
      of the other's at the fixed points of the closed forms below
      (``y = -\frac{1}{2}x + \frac{3}{4} == 2x + 4y - 3 = 0``, ``5 = x == x = 5``).
      One with no variable left in lhs - rhs (``0 = 0``) matches none; a factor
      that is 0 or holds a variable does not count (so ``y = 1/x`` is not
      ``xy = 1``), and an expression never matches an equation (P).
    * A relation (``<``, ``>``, ``\leq``, ``\geq``, ``\neq``; also ``\le``, ``>=``
      and the unicode signs) that is linear in its one variable, with a
      coefficient of one term (``2``, ``-\sqrt{2}``), is its solution set:
      ``5 \leq x == x \geq 5``, ``-x > -1 == x < 1``, ``x > 0 != x \geq 0``.
      Others (``x^2 > 4``, two variables, ``1 < x < 2``) are compared as text;
      a relation is not an interval or a number (P).
    * ``pmatrix`` and ``bmatrix`` matrices are compared entry by entry, shape
      included; a matrix matches only a matrix, not the tuple ``(1, 2)`` (P);
      ``vmatrix`` (a determinant) is not read.
    * ``(1, 2)``, ``[1, 2)``: ordered tuples and intervals, brackets must match.
      A bare list (commas, ``;``, ``and``, ``or``, ``\{1, 3\}``, ``a \pm b``) is
      a multiset of answers: order does not matter, the count does (P).
    * Closed forms are read by a small parser of this module (numbers, + - * / ^,
      ``\frac`` also brace-less, ``\sqrt``, ``\pi``, implicit products, one-letter
      variables and a few Greek names; no implicit product before a number).
      Without variables the value is exact, a sum of rational x surd x pi^k
      (``\sqrt{12} == 2\sqrt{3}``, ``2^{40}`` == its integer). With variables,
      both sides are compared at three fixed rational points (``3x+2 == 2+3x``).
      Only a division by a sum of surds falls back to 60-digit decimals kept to 30
      significant digits, and never when a decimal point is written (P). It
      refuses (no match) over 200 characters, depth 30, |power| 64, 4096-bit
      numbers, radicands over 1e8, unknown commands (``\sin``, ``\log``) and
      ``2^10`` (LaTeX reads 2^1 then 0) (P).
    * Anything else is compared as a normalised string: LaTeX spacing,
      ``\left``/``\right``, ``\text{}``/``\mathrm{}``, ``$`` and a trailing
      period removed, case-insensitive when only letters remain
      (``\text{B} == b``).
    * An empty answer never matches anything, ``0`` included. Where in doubt,
      no match: a false reward is worse than a missed one (P).

Model output is untrusted: nothing here evaluates it (no eval, exec or
sympy), answers longer than _MAX_ANSWER_CHARS never match, exponents are
capped, every scan of the whole completion is linear (slower steps only ever
see an answer of at most _MAX_ANSWER_CHARS), so even a 200 KB degenerate
completion is scored in milliseconds. No function raises on any input.
"""

from __future__ import annotations

import math
import re
from decimal import Context, Decimal, localcontext
from fractions import Fraction

_MAX_ANSWER_CHARS = 1000  # longer "answers" are junk; also keeps int() well inside its limits
_MAX_EXPONENT = 1000      # 1e999999999 would build a billion-digit integer
_MAX_DEPTH = 5            # nesting of tuples inside tuples

# --- extraction ------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# "answer isn't" is no answer, hence the look-ahead
_ANSWER_PHRASE = re.compile(r"answer is(?![a-z'])|answer:", re.IGNORECASE)
_NUMBER_CHARS = frozenset("0123456789,./")
# A number at the very end of a short string: optional thousands groups,
# decimals and one '/'. Only ever run on at most _MAX_ANSWER_CHARS characters.
_INT = r"(?:[1-9]\d{0,2}(?:,\d{3})+|\d+)"  # thousands groups only after a non-zero lead
_TRAILING_NUMBER = re.compile(rf"{_INT}(?:\.\d+)?(?:/{_INT}(?:\.\d+)?)?$|\.\d+$")


def _brace_pairs(text: str, start: int) -> dict[int, int]:
    """Map each '{' at or after `start` to its matching '}' (one linear pass)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # skip the escaped character: \{ and \} are literal braces
            i += 2
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _boxes(text: str, count: int) -> list[str]:
    """The contents of the last `count` complete, non-empty boxes, in reading order."""
    starts = []
    for command in _BOX_COMMANDS:
        i = text.find(command)
        while i != -1:
            starts.append((i, i + len(command)))
            i = text.find(command, i + 1)
    if not starts:
        return []
    pairs = _brace_pairs(text, min(starts)[0])
    found: list[str] = []
    for _, after in sorted(starts, reverse=True):
        while after < len(text) and text[after].isspace():  # "\boxed {x}"
            after += 1
        close = pairs.get(after)
        if close is not None and text[after + 1 : close].strip():
            found.append(text[after + 1 : close].strip())
            if len(found) == count:
                break
    return found[::-1]


def _last_box(text: str) -> str | None:
    boxes = _boxes(text, 1)
    return boxes[0] if boxes else None


def _after_hashes(text: str) -> str | None:
    i = text.rfind("####")
    if i == -1:
        return None
    return text[i + 4 :].split("\n", 1)[0].strip() or None


def _after_phrase(text: str) -> str | None:
    last = None
    for last in _ANSWER_PHRASE.finditer(text):
        pass
    if last is None:
        return None
    # a window, not the whole tail: an over-long "sentence" is no answer anyway
    rest = text[last.end() : last.end() + 2 * _MAX_ANSWER_CHARS].lstrip(" \t:").split("\n", 1)[0]
    # end of sentence: . ? or ! followed by a space (so 3.5 survives)
    for j, ch in enumerate(rest):
        if ch in ".?!" and (j + 1 == len(rest) or rest[j + 1].isspace()):
            rest = rest[:j]
            break
    return _one_answer_in(rest.strip()) or None


def _one_answer_in(sentence: str) -> str:
    """'The largest $n$ is 34' -> '34': a sentence whose only number ends it, with no digits in its maths.

    Otherwise the sentence is kept whole ('$\\frac{3}{4}$ dollars', '1 million', 'x = 5').
    """
    pieces = sentence.split("$")
    maths, words = pieces[1::2], " ".join(pieces[::2])
    if len(pieces) % 2 == 0 or not words.strip() or any(ch.isdigit() for piece in maths for ch in piece):
        return sentence
    numbers = [run for run in _NUMBER_RUN.findall(words) if run.rstrip(",./")]
    number = _last_number(words)
    if len(numbers) != 1 or number is None or not words.rstrip(" .").endswith(number.lstrip("-")):
        return sentence
    return number


def _last_maths(text: str) -> str | None:
    """The last '$...$' of a completion when its last number lies inside it: '$\\frac{10}{9}$.' -> \\frac{10}{9}."""
    close = text.rfind("$")
    open_ = text.rfind("$", 0, close)
    while open_ > 0 and text[open_ - 1] == "$":  # $$...$$
        open_ -= 1
    inside = text[open_:close].strip("$ ")
    after = text[close + 1 :]
    if open_ == -1 or not inside or len(inside) > _MAX_ANSWER_CHARS or any(ch.isdigit() for ch in after):
        return None
    return inside if any(ch.isdigit() for ch in inside) else None


def _before_invented_question(text: str) -> str:
    """A completion that runs on into a new 'Question: ...' of its own is scored on what comes before it."""
    m = _NEXT_QUESTION.search(text)
    return text[: m.start()] if m is not None and text[: m.start()].strip() else text


_NEXT_QUESTION = re.compile(r"\n\s*(?:Question|Problem|Q)\s*:")
_NUMBER_RUN = re.compile(r"[0-9][0-9,./]*")


def _last_number(text: str) -> str | None:
    """The last number that stands on its own: 'AZYUK2A' holds none, '5cm' neither."""
    end = 0
    for run in _NUMBER_RUN.finditer(text):  # one linear pass; keep the last free-standing run
        start, stop = run.start(), run.start() + len(run.group().rstrip(",./"))
        if (start == 0 or not text[start - 1].isalnum()) and (stop == len(text) or not text[stop].isalnum()):
            begin, end = start, stop
    if end == 0:
        return None
    start = begin
    while start > 0 and text[start - 1] in _NUMBER_CHARS:
        start -= 1
    if end - start > _MAX_ANSWER_CHARS:  # a wall of digits is not an answer
        return None
    match = _TRAILING_NUMBER.search(text, start, end)
    if match is None:
        return None
    number, begin = match.group(), match.start()
    # a minus sign counts only when it is not a hyphen or subtraction: "3-5" -> "5"
    if begin > 0 and text[begin - 1] in "-\u2212" and (begin == 1 or text[begin - 2] in " \t\n($=:"):
        number = "-" + number
    return number


def extract_answer(text: str) -> str | None:
    r"""Return the final answer of a completion (see the module docstring), or None.

    Pass only the generated completion, never the prompt.

    >>> extract_answer(r"Half of it: $\boxed{\frac{1}{2}}$.")
    '\\frac{1}{2}'
    >>> extract_answer("She pays 3 * 6 = 18 dollars.\n#### 18")
    '18'
    >>> extract_answer("I have no idea.") is None
    True
    """
    if not isinstance(text, str):
        return None
    text = _before_invented_question(text)
    return _last_box(text) or _after_hashes(text) or _after_phrase(text) or _last_maths(text) or _last_number(text)


# --- normalisation -----------------------------------------------------------

_UNWRAP = re.compile(
    r"\\(?:text|textbf|textit|textnormal|textrm|mathrm|mathbf|mathit|mbox|operatorname|boxed|fbox)\s*\{")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])")
_BRACED_COMMA = re.compile(r"\s*\{\s*,\s*\}\s*")
# brace-less fraction arguments are single characters: \frac12 is 1/2, never 1 over 2-something
_BARE_FRAC = re.compile(r"\\frac\s*([0-9A-Za-z])\s*([0-9A-Za-z])")
_SEPARATOR_WORD = re.compile(r"\s*,?\s+(?:and|or)\s+")
_DIGIT_SPACE_DIGIT = re.compile(r"(?<=\d) +(?=\d)")
_THIN_SPACE_SEPARATOR = re.compile(r"(?<=\d),\\!\s+(?=\d)")  # '11,\! 111' is '11,\!111': one number
# \geq, \le, \neq, ... and their unicode signs are written >=, <=, != (read by _relation)
_RELATION_SIGN = re.compile(r"\\(geqslant|geq|ge|gt|leqslant|leq|le|lt|neq|ne)(?![A-Za-z])|([\u2265\u2264\u2260])")
_SIGNS = {"geqslant": ">=", "geq": ">=", "ge": ">=", "gt": ">", "leqslant": "<=", "leq": "<=", "le": "<=",
          "lt": "<", "neq": "!=", "ne": "!=", "\u2265": ">=", "\u2264": "<=", "\u2260": "!="}
# (literal, replacement), applied in order
_REPLACEMENTS = (
    ("\\\\", " \\cr "),  # a matrix row ends with \\ (TeX's \cr); first, so that '\\ 0' is not read as '\ ' + '0'
    ("\u2212", "-"), ("\u00a0", " "), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"),
    ("\\,", " "), ("\\!", ""), ("\\;", " "), ("\\:", " "), ("\\ ", " "),
    ("~", " "), ("\\qquad", " "), ("\\quad", " "),
    ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\degree", ""), ("\u00b0", ""),
    ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""), ("\u20ac", ""), ("\u00a3", ""),
    ("\u03c0", "\\pi "), ("\u221a", "\\sqrt"),
    ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""),
)
# words that change the value, so "1 million" is not 1 and "3 i" is not 3
_NOT_UNITS = frozenset({"i", "hundred", "thousand", "million", "billion", "trillion", "dozen"})


def _unwrap_text_commands(s: str) -> str:
    r"""'5\text{ cm}^2' -> '5  cm^2': keep the content, drop the command and braces.

    The space in front separates a unit from its number: '5\text{cm}' -> '5 cm'.
    """
    while (m := _UNWRAP.search(s)) is not None:
        close = _brace_pairs(s, m.end() - 1).get(m.end() - 1)
        if close is None:  # unbalanced: drop the opener and carry on
            s = s[: m.start()] + s[m.end() :]
        else:
            s = s[: m.start()] + " " + s[m.end() : close] + s[close + 1 :]
    return s


def _normalize(s: str) -> str:
    if len(s) > _MAX_ANSWER_CHARS:
        return ""
    s = _BRACED_COMMA.sub(",", _unwrap_text_commands(s))  # '14{,}916', '14 { , } 916' -> '14,916'
    s = _THIN_SPACE_SEPARATOR.sub(",", s)
    s = _LEFT_RIGHT.sub("", s)
    s = _RELATION_SIGN.sub(lambda m: _SIGNS[m.group(1) or m.group(2)], s)
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    s = _DIGIT_SPACE_DIGIT.sub(",", " ".join(s.split()))  # "1\,000" -> "1 000" -> "1,000"
    s = _BARE_FRAC.sub(r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2} (\frac3{4} is read by _FormParser)
    s = _SEPARATOR_WORD.sub(",", s.replace(";", ","))  # '1; 3', '1 and 3', '1 or 3' are lists
    return s.rstrip(". ").strip()


# --- numbers -------------------------------------------------------------------

_DECIMAL = re.compile(rf"([+-]?)({_INT}?)(?:\.(\d+))?(?:[eE]([+-]?\d+))?")
_POWER_OF_TEN = re.compile(r"10\^(?:\{([+-]?\d+)\}|([+-]?\d+))")
_TIMES = ("\\times", "\\cdot", "\u00d7", "\u00b7", "*")
_FRAC = re.compile(r"([+-]?)\\frac(?:\{([^{}]*)\}\{([^{}]*)\}|(\d)(\d))")


def _decimal(s: str) -> Fraction | None:
    """'-1,234.50', '1.5e3', '1.5\\times10^{3}' -> exact Fraction."""
    exponent = 0
    for times in _TIMES:
        if times in s:
            s, _, power = s.rpartition(times)
            m = _POWER_OF_TEN.fullmatch(power)
            if m is None:
                return None
            exponent = int(m.group(1) or m.group(2))
            break
    m = _DECIMAL.fullmatch(s)
    if m is None or not (m.group(2) or m.group(3)) or (exponent and m.group(4)):
        return None
    sign, whole, frac, exp = m.groups()
    exponent += int(exp or 0)
    if abs(exponent) > _MAX_EXPONENT:
        return None
    frac = frac or ""
    value = Fraction(int(whole.replace(",", "") + frac or "0"), 10 ** len(frac)) * Fraction(10) ** exponent
    return -value if sign == "-" else value


def _number(s: str) -> Fraction | None:
    """Parse a whole, space-free string as a number, or return None."""
    m = _FRAC.fullmatch(s)
    if m is not None:
        parts = (m.group(2), m.group(3)) if m.group(2) is not None else (m.group(4), m.group(5))
        top, bottom = _decimal(parts[0]), _decimal(parts[1])
        if top is None or not bottom:  # unparsable, or division by zero
            return None
        return -top / bottom if m.group(1) == "-" else top / bottom
    if s.count("/") == 1:
        top, bottom = (_decimal(part) for part in s.split("/"))
        return top / bottom if top is not None and bottom else None
    return _decimal(s)


def _is_unit(word: str) -> bool:
    word = word.split("^", 1)[0]  # cm^2, m^{3}
    return word.isascii() and word.isalpha() and word.lower() not in _NOT_UNITS


def _number_with_units(s: str) -> Fraction | None:
    """'18 dollars' -> 18, '5 square feet' -> 5; None when s is not a number."""
    words = s.split(" ")
    while len(words) > 1 and _is_unit(words[-1]):
        words.pop()
    if any(word.startswith(",") or word.endswith(",") for word in words[:-1]):
        return None  # '32, 349' is a list of two numbers, not 32349
    return _number("".join(words))



# --- closed forms: a small parser of our own, exact where it can be, never eval ---------------

_MAX_FORM_CHARS = 200    # longer expressions are not compared as closed forms
_MAX_FORM_DEPTH = 30     # nesting of brackets, fractions, roots and powers
_MAX_POWER = 64          # |n| in x^n; a larger power refuses
_MAX_BITS = 4096         # size of any exact numerator or denominator met on the way
_MAX_TERMS = 64          # distinct surd terms in an exact value
_MAX_RADICAND = 10**8    # square factors of a radicand are found by trial division up to its root
_FORM_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|(\\[A-Za-z]+)|([A-Za-z](?:_(?:\{\w+\}|\w))?)|(\S))")
_GREEK = frozenset({"alpha", "beta", "gamma", "delta", "theta", "lambda", "mu", "phi", "omega", "sigma", "tau"})
_TIMES_COMMANDS = frozenset({"\\cdot", "\\times"})
_PI_DIGITS = "3.14159265358979323846264338327950288419716939937510582097494459230781640628620899863"
_MAX_VARIABLES = 8


def _point_value(name: str, j: int) -> Fraction:
    """The fixed value of variable `name` at evaluation point j (0, 1, 2): it depends on the name, so 3x != 3y."""
    code = sum((k + 1) * ord(ch) for k, ch in enumerate(name))
    return Fraction(31 * (code % 1009) + 17 + 29 * j, 13 + 2 * j)


class _Refuse(Exception):
    """A closed form this module will not decide (a limit hit, an unknown command, a non-integer power)."""


# what reading or computing with a closed form may raise; each means: no value, no match
_FORM_ERRORS = (_Refuse, ArithmeticError, ValueError, KeyError, IndexError, RecursionError)


def _form_tokens(s: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(s):
        m = _FORM_TOKEN.match(s, pos)
        if m is None:  # only trailing spaces are left
            break
        pos = m.end()
        number, command, name, char = m.groups()
        if number is not None:
            tokens.append(("num", number))
        elif command is not None:
            if command in _TIMES_COMMANDS:
                tokens.append(("op", "*"))
            elif command in ("\\pi", "\\sqrt", "\\frac") or command[1:] in _GREEK:
                tokens.append(("cmd", command))
            else:
                raise _Refuse(command)
        elif name is not None:
            tokens.append(("var", name.replace("{", "").replace("}", "")))
        elif char in "+-*/^(){}":
            tokens.append(("op", char))
        elif char in "\u00d7\u00b7":
            tokens.append(("op", "*"))
        else:
            raise _Refuse(char)
    return tokens


class _FormParser:
    """expr := term (+|- term)*; term := factor ((*|/|nothing) factor)*; factor := -factor | atom (^ atom)."""

    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens, self.i, self.depth = tokens, 0, 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "")

    def take(self, kind: str, text: str) -> None:
        if self.peek() != (kind, text):
            raise _Refuse(text)
        self.i += 1

    def expr(self) -> tuple:
        self.depth += 1
        if self.depth > _MAX_FORM_DEPTH:
            raise _Refuse("depth")
        node = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.peek()[1]
            self.i += 1
            right = self.term()
            node = ("add", node, right if op == "+" else ("neg", right))
        self.depth -= 1
        return node

    def term(self) -> tuple:
        node = self.factor()
        while True:
            kind, text = self.peek()
            if (kind, text) in (("op", "*"), ("op", "/")):
                self.i += 1
                right = self.factor()
                node = ("mul", node, right) if text == "*" else ("div", node, right)
            elif kind in ("var", "cmd") or (kind, text) in (("op", "("), ("op", "{")):
                node = ("mul", node, self.factor())  # implicit product: 2x, 3\pi, 2\sqrt{3}; never '2 3'
            else:
                return node

    def factor(self) -> tuple:
        if self.peek() in (("op", "-"), ("op", "+")):
            sign = self.peek()[1]
            self.i += 1
            node = self.factor()
            return ("neg", node) if sign == "-" else node
        base = self.atom()
        if self.peek() != ("op", "^"):
            return base
        self.i += 1
        if self.peek()[0] == "num" and len(self.peek()[1]) > 1:
            raise _Refuse("x^10 is ambiguous: x^1 times 0 in LaTeX, x^{10} in plain text")
        exponent = self.factor() if self.peek() == ("op", "-") else self.atom()
        if self.peek() == ("op", "^"):
            raise _Refuse("a^b^c")
        return ("pow", base, exponent)

    def atom(self) -> tuple:
        kind, text = self.peek()
        self.i += 1
        if kind == "num":
            return ("num", text)
        if kind == "var":
            return ("var", text)
        if (kind, text) in (("op", "("), ("op", "{")):
            node = self.expr()
            self.take("op", ")" if text == "(" else "}")
            return node
        if text == "\\pi":
            return ("pi",)
        if text == "\\sqrt":
            return ("sqrt", self.argument())
        if text == "\\frac":
            top = self.argument()
            return ("div", top, self.argument())
        if kind == "cmd":
            return ("var", text)
        raise _Refuse(text or "end")

    def argument(self) -> tuple:
        """A braced group, or one token: \\sqrt3, \\frac12 was already braced by _normalize."""
        if self.peek() == ("op", "{"):
            return self.atom()
        kind, text = self.peek()
        if kind == "num" and len(text) > 1:
            raise _Refuse(text)
        return self.atom()


# An exact value is a sum of coef * sqrt(r) * pi^k over (r, k) with r square-free: {(r, k): coef}.
_Exact = dict


def _check(value: _Exact) -> _Exact:
    if len(value) > _MAX_TERMS:
        raise _Refuse("terms")
    for coef in value.values():
        if coef.numerator.bit_length() > _MAX_BITS or coef.denominator.bit_length() > _MAX_BITS:
            raise _Refuse("size")
    return value


def _exact_add(a: _Exact, b: _Exact) -> _Exact:
    out = dict(a)
    for key, coef in b.items():
        out[key] = out.get(key, 0) + coef
    return _check({key: coef for key, coef in out.items() if coef})


def _exact_mul(a: _Exact, b: _Exact) -> _Exact:
    out: _Exact = {}
    for (r1, k1), c1 in a.items():
        for (r2, k2), c2 in b.items():
            g = math.gcd(r1, r2)  # sqrt(r1 r2) = g sqrt(r1 r2 / g^2), still square-free
            key = (r1 // g * (r2 // g), k1 + k2)
            out[key] = out.get(key, 0) + c1 * c2 * g
            if abs(key[1]) > _MAX_POWER:
                raise _Refuse("pi power")
    return _check({key: coef for key, coef in out.items() if coef})


def _exact_inverse(a: _Exact) -> _Exact:
    if len(a) != 1:
        raise _Refuse("division by a sum")  # left to the evaluation at points
    ((r, k), c), = a.items()
    return {(r, -k): 1 / (c * r)}


def _exact_sqrt(a: _Exact) -> _Exact:
    if not a:
        return {}
    if len(a) != 1:
        raise _Refuse("root of a sum")
    ((r, k), c), = a.items()
    if r != 1 or k % 2 or c < 0:
        raise _Refuse("root")
    n, outside = c.numerator * c.denominator, 1  # sqrt(p/q) = sqrt(p q) / q
    if n > _MAX_RADICAND:
        raise _Refuse("radicand")
    f = 2
    while f * f <= n:
        while n % (f * f) == 0:
            n, outside = n // (f * f), outside * f
        f += 1
    return {(n, k // 2): Fraction(outside, c.denominator)}


def _integer_power(exponent) -> int:
    if not isinstance(exponent, Fraction) or exponent.denominator != 1 or abs(exponent) > _MAX_POWER:
        raise _Refuse("power")
    return int(exponent)


def _exact(node: tuple, point: dict[str, Fraction]) -> _Exact:
    kind = node[0]
    if kind == "num":
        value = Fraction(node[1])
        return {(1, 0): value} if value else {}
    if kind == "var":
        return {(1, 0): point[node[1]]}
    if kind == "pi":
        return {(1, 1): Fraction(1)}
    if kind == "neg":
        return {key: -coef for key, coef in _exact(node[1], point).items()}
    if kind == "add":
        return _exact_add(_exact(node[1], point), _exact(node[2], point))
    if kind == "mul":
        return _exact_mul(_exact(node[1], point), _exact(node[2], point))
    if kind == "div":
        return _exact_mul(_exact(node[1], point), _exact_inverse(_exact(node[2], point)))
    if kind == "sqrt":
        return _exact_sqrt(_exact(node[1], point))
    exponent = _exact(node[2], point)  # pow
    if set(exponent) - {(1, 0)}:
        raise _Refuse("power")
    n = _integer_power(exponent.get((1, 0), Fraction(0)))
    base = _exact(node[1], point)
    if n < 0:
        base, n = _exact_inverse(base), -n
    result: _Exact = {(1, 0): Fraction(1)}
    for _ in range(n):
        result = _exact_mul(result, base)
    return result


def _approx(node: tuple, point: dict[str, Fraction]) -> Decimal:
    """The same value in 60-digit decimal arithmetic (only for what _exact refuses: division by a sum)."""
    kind = node[0]
    if kind == "num":
        return Decimal(node[1])
    if kind == "var":
        return Decimal(point[node[1]].numerator) / point[node[1]].denominator
    if kind == "pi":
        return Decimal(_PI_DIGITS)
    if kind == "neg":
        return -_approx(node[1], point)
    if kind in ("add", "mul", "div"):
        a, b = _approx(node[1], point), _approx(node[2], point)
        return a + b if kind == "add" else a * b if kind == "mul" else a / b
    if kind == "sqrt":
        return _approx(node[1], point).sqrt()
    exponent = _approx(node[2], point)
    if exponent != exponent.to_integral_value() or abs(exponent) > _MAX_POWER:
        raise _Refuse("power")
    return _approx(node[1], point) ** int(exponent)


def _variables(node: tuple) -> set[str]:
    if node[0] == "var":
        return {node[1]}
    return set().union(*(_variables(child) for child in node[1:] if isinstance(child, tuple)))


def _parse_form(s: str) -> tuple:
    """The tree of a whole closed form; raises _Refuse for anything else."""
    if len(s) > _MAX_FORM_CHARS:
        raise _Refuse("length")
    parser = _FormParser(_form_tokens(s))
    tree = parser.expr()
    if parser.peek()[0] != "end":
        raise _Refuse("trailing text")
    return tree


def _closed_form(s: str) -> Fraction | tuple | None:
    """A canonical value for a closed form: a Fraction when it is rational, else a comparable key; None refuses.

    Without variables the value is exact (a sum of rational * surd * pi^k terms). With one-letter variables
    it is the tuple of exact values at three fixed points. Only a division by a sum of surds falls back to
    60-digit decimals, kept to 30 significant digits, and never when the text holds a decimal point.
    """
    try:
        tree = _parse_form(s)
        names = _variables(tree)
        if len(names) > _MAX_VARIABLES:
            return None
        points = [{name: _point_value(name, j) for name in names} for j in range(3 if names else 1)]
        try:
            values = tuple(tuple(sorted(_exact(tree, point).items())) for point in points)
        except _Refuse:
            if "." in s:
                return None
            with localcontext(Context(prec=60, Emax=10**6, Emin=-(10**6))):
                approx = [_approx(tree, point) for point in points]
            return ("approx", tuple("0" if abs(v) < Decimal("1e-40") else f"{v:.30e}" for v in approx))
        if not names and all(key == (1, 0) for key, _ in values[0]):
            return values[0][0][1] if values[0] else Fraction(0)
        return ("exact", values)
    except _FORM_ERRORS:
        return None


# --- matrices: entry by entry ------------------------------------------------------------------

_MATRIX = re.compile(r"\\begin\{([pb])matrix\}(.*)\\end\{\1matrix\}")


def _matrix(s: str, depth: int) -> tuple | None:
    """'\\begin{pmatrix} 1 & 2 \\cr 3 & 4 \\end{pmatrix}' (or bmatrix) -> ('matrix', rows of entry values);
    None unless every entry has a value (an empty one has none)."""
    m = _MATRIX.fullmatch(s)
    if m is None or depth >= _MAX_DEPTH:
        return None
    rows = [row.split("&") for row in m.group(2).split("\\cr")]
    if len(rows) > 1 and not rows[-1][0].strip() and len(rows[-1]) == 1:
        rows.pop()  # a \\ before \end{pmatrix}
    values = tuple(tuple(_value(entry.strip(), depth + 1) for entry in row) for row in rows)
    if any(None in row for row in values):
        return None
    return ("matrix", values)


# --- relations: solution sets of what is linear in one variable -------------------------------

_RELATION = re.compile(r"(<=|>=|!=|<|>)")  # after _normalize has spelled \geq, \le, \neq, ... this way
_FLIPPED = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "!=": "!="}


def _difference(lhs: str, rhs: str) -> tuple:
    """The tree of lhs - rhs, two closed forms."""
    return ("add", _parse_form(lhs), ("neg", _parse_form(rhs)))


def _degree(node: tuple) -> int:
    """The degree of a tree as a polynomial in its variables; _Refuse when it is none (a variable under a
    fraction bar, a root or a power that is not a plain integer)."""
    kind = node[0]
    if kind in ("num", "pi", "var"):
        return int(kind == "var")
    if kind == "neg":
        return _degree(node[1])
    if kind in ("add", "mul"):
        a, b = _degree(node[1]), _degree(node[2])
        return max(a, b) if kind == "add" else a + b
    if kind in ("div", "sqrt"):
        if _degree(node[-1]) != 0:
            raise _Refuse("variable in a denominator or a root")
        return _degree(node[1]) if kind == "div" else 0
    base, exponent = _degree(node[1]), node[2]  # pow
    if base and exponent[0] == "num" and exponent[1].isdigit():
        return base * int(exponent[1])
    if base or _degree(exponent):
        raise _Refuse("variable in a power")
    return 0


def _relation(s: str) -> tuple | None:
    """'x >= 5', '5 <= x', '-2x < -10': ('relation', variable, sign, bound) with the variable alone on the
    left, so equal solution sets give equal values. None unless s is one relation, linear in one variable."""
    parts = _RELATION.split(s)
    if len(parts) != 3:
        return None
    lhs, sign, rhs = parts
    try:
        tree = _difference(lhs, rhs)  # a x + b, compared with 0
        names = _variables(tree)
        if len(names) != 1 or _degree(tree) != 1:
            return None
        (name,) = names
        b = _exact(tree, {name: Fraction(0)})
        a = _exact_add(_exact(tree, {name: Fraction(1)}), {key: -coef for key, coef in b.items()})
        # -b / a; _exact_inverse refuses a = 0 and a sum of surds (whose sign is not read off without decimals)
        bound = {key: -coef for key, coef in _exact_mul(b, _exact_inverse(a)).items()}
        positive = next(iter(a.values())) > 0  # one term c sqrt(r) pi^k: its sign is the sign of c
        return ("relation", name, sign if positive else _FLIPPED[sign], tuple(sorted(bound.items())))
    except _FORM_ERRORS:
        return None


# --- equations: the same up to a nonzero factor ----------------------------------------------

_EQUATION_SIGN = re.compile(r"(?<![<>!])=")


def _same_equation(a: str, b: str) -> bool:
    """'y = -\\frac{1}{2}x + \\frac{3}{4}' and '2x + 4y - 3 = 0': is lhs - rhs of one a nonzero constant multiple
    of the other's? Compared exactly at the fixed points; an equation without a variable (0 = 0) matches none."""
    sides = [_EQUATION_SIGN.split(s) for s in (a, b)]
    if any(len(pair) != 2 for pair in sides):
        return False
    try:
        trees = [_difference(*pair) for pair in sides]
        names = _variables(trees[0]) | _variables(trees[1])
        if not (_variables(trees[0]) and _variables(trees[1])) or len(names) > _MAX_VARIABLES:
            return False
        points = [{name: _point_value(name, j) for name in names} for j in range(3)]
        p, q = ([_exact(tree, point) for point in points] for tree in trees)
        # p = k q with one k != 0: at a point where neither is 0, p_j q_i == p_i q_j at every other point j
        i = next((j for j in range(3) if p[j] and q[j]), None)
        return i is not None and all(_exact_mul(p[j], q[i]) == _exact_mul(p[i], q[j]) for j in range(3))
    except _FORM_ERRORS:
        return False


# --- structured values ---------------------------------------------------------

_OPEN, _CLOSE = "([{", ")]}"


def _split_top_level(s: str) -> list[str] | None:
    """Split on commas outside any brackets; None if brackets do not balance."""
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(s):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                return None
        elif ch == "," and depth == 0:
            parts.append(s[last:i].strip())
            last = i + 1
    parts.append(s[last:].strip())
    return parts if depth == 0 else None


def _encloses(s: str) -> bool:
    """Does the bracket at s[0] close at s[-1]? '(1,2)' yes, '(1)+(2)' no."""
    depth = 0
    for i, ch in enumerate(s):
        depth += (ch in _OPEN) - (ch in _CLOSE)
        if depth == 0:
            return i == len(s) - 1
    return False


# one name on the left of '=' or '\in': x, a_3, x_{12}, f(x), \theta, r after \text{r} was unwrapped, a segment
# or an area (AB, |AB|, S_{ABC}) or a ratio of names (A:B, S_{ABC}:S)
_NAME = r"(?:[A-Za-z]|[A-Z]{2,3}|\\[A-Za-z]+)(?:_(?:\w|\{\w+\}))?"
_LABEL = re.compile(rf"{_NAME}(?:\([A-Za-z, ]*\))?|\|[A-Z]{{2,3}}\||{_NAME} ?: ?{_NAME}")


def _is_label(s: str) -> bool:
    """'x', 'f(x)', '(x, y)': a name for the answer, never an expression that has a value of its own."""
    if s[:1] == "(" and _encloses(s):
        parts = _split_top_level(s[1:-1])
        return parts is not None and all(_LABEL.fullmatch(part) for part in parts)
    return _LABEL.fullmatch(s) is not None


def _rhs(s: str) -> str:
    """'x = 5' -> '5', 'y = x = 5' -> '5', 'x \\in [0, 1]' -> '[0, 1]'.

    Only a label is cut off: 'x^2 - 4x = 0' and '7 = 11a + c' stay whole (their sides are
    not answers), and so do comparisons (<=, >=, !=) and 'a=1, b=2'.
    """
    while True:
        m = _EQUALS.search(s)
        if m is None or not _is_label(s[: m.start()].strip()):
            return s
        s = s[m.end() :].strip()


_EQUALS = re.compile(r"(?<![<>!])=|\\in(?![A-Za-z])")


_Value = Fraction | str | tuple  # a number, a normalised string, or (open, close, items)


def _value(s: str, depth: int = 0) -> _Value | None:
    """Canonical form of a normalised answer: equal forms mean equivalent answers."""
    s = _rhs(s)
    if not s:
        return None
    matrix = _matrix(s, depth) if s.startswith("\\begin") else None
    if matrix is not None:
        return matrix
    if depth < _MAX_DEPTH and len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _encloses(s):
        items = _split_top_level(s[1:-1])
        if items is not None and len(items) == 1 and s[0] + s[-1] == "()":
            return _value(items[0], depth + 1)  # "(5)" is just 5, "(B)" is just B
        if items is not None and len(items) > 1:
            values = tuple(_value(item, depth + 1) for item in items)
            if None not in values:
                return (s[0], s[-1], values)
    if s.startswith("\\{") and s.endswith("\\}"):
        s = s[2:-2]  # a set '\{1, 3\}' is a list of answers
    if s.count("\\pm") == 1:  # 'a \pm b' is the list 'a + b, a - b'
        a, b = s.split("\\pm")
        s = f"{a}+({b}), {a}-({b})" if a.strip() else f"{b}, -({b})"
    number = _number_with_units(s)
    if number is not None:
        return number
    relation = _relation(s) if _RELATION.search(s) else None
    if relation is not None:
        return relation
    compact = s.replace(" ", "")
    if not compact.isalpha():
        closed = _closed_form(s)
        if closed is not None:
            return closed
    items = _split_top_level(s)
    if depth < _MAX_DEPTH and items is not None and len(items) > 1:
        values = [_value(item, depth + 1) for item in items]
        if None not in values:  # a bare list of solutions: order does not matter
            return ("", "", tuple(sorted(values, key=repr)))
    compact = s.replace(" ", "")
    return compact.lower() if compact.isalpha() else compact


def is_equiv(pred: str, gold: str) -> bool:
    r"""Are two final answers mathematically the same? (Policy: module docstring.)

    >>> is_equiv(r"\dfrac{1}{2}", "0.5"), is_equiv("1,000", "1000"), is_equiv("0.333", "1/3")
    (True, True, False)
    >>> is_equiv(r"\$18", "18 dollars"), is_equiv("(1, 2)", "[1,2]"), is_equiv("", "0")
    (True, False, False)
    """
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    pred, gold = _normalize(pred), _normalize(gold)
    a, b = _value(pred), _value(gold)
    return a is not None and (a == b or _same_equation(pred, gold))


def math_reward(completion: str, gold: str) -> float:
    r"""1.0 if the completion's final answer is equivalent to `gold`, else 0.0.

    >>> math_reward(r"... so $x = \boxed{5.0}$", "5")
    1.0
    >>> math_reward("No boxed answer, just words.", "0")
    0.0
    """
    pred = extract_answer(completion)
    if pred is None or not isinstance(gold, str):
        return 0.0
    if is_equiv(pred, gold):
        return 1.0
    # a gold list of n answers may be written as n boxes: '\boxed{-2} and \boxed{1}' for '-2, 1'
    gold_value = _value(_normalize(gold))
    if isinstance(gold_value, tuple) and gold_value[0] == "" and len(gold_value[2]) > 1:
        boxes = _boxes(_before_invented_question(completion), len(gold_value[2]))
        if is_equiv(", ".join(boxes), gold):  # a list compares item by item: fewer boxes cannot match
            return 1.0
    return 0.0


def gsm8k_gold(answer_field: str) -> str:
    """The gold answer of a GSM8K `answer` field: the text after its last '####'.

    Thousands separators and '$' are removed; '' (which matches nothing) when
    there is no '####'.

    >>> gsm8k_gold("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n#### 1,234")
    '1234'
    """
    if not isinstance(answer_field, str) or "####" not in answer_field:
        return ""
    answer = answer_field.rsplit("####", 1)[1].split("\n", 1)[0]
    return answer.replace(",", "").replace("$", "").strip().rstrip(".")
