"""
Final-answer extraction and equivalence for GSM8K- and MATH-style answers (data.py re-exports these).
Pure string work: text from a model is never evaluated (no eval, no exec, no sympy). Numbers compare exactly as
fractions.Fraction, so 0.5 == \\frac{1}{2} == 1/2 and 0.1 + 0.2 rounding never enters.

Not handled (compared as normalised strings, so they count as different): algebraic forms of the same value
(\\sqrt{2}/2 vs \\frac{\\sqrt{2}}{2}), unordered sets, scientific notation, percent vs fraction (50\\% vs 0.5).
"""

import re
from fractions import Fraction

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
ANSWER_IS = re.compile(r"the (?:final )?answer is:?\s*(.+)", re.IGNORECASE)
TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mbox|mathrm|mathbf)\{([^{}]*)\}")
# Units after a number: words ("5 cm", "\frac{1}{2} sq. units"; one letter would be a variable: "2 x"), or any
# \text{...} ("16 \text{ m}^2").
UNIT_WORDS = re.compile(r"^(.*?[\d}])\s+[a-zA-Z]{2,}[a-zA-Z\s.]*(\^\d)?$")
UNIT_TEXT = re.compile(r"^(.*?[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z\s.]*\}(\^\{?\d\}?)?$")
CHOICE = re.compile(r"\(([A-Ea-e])\)|([A-E])[.):]?")


def last_boxed(text):
    """The content of the last \\boxed{...} or \\fbox{...} (nested braces kept), or None."""
    k = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if k < 0:
        return None
    i = k + (6 if text.startswith("\\boxed", k) else 5)
    if text[i:i + 1] == " ":  # "\boxed 5"
        m = re.match(r"\s*([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if text[i:i + 1] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced braces: no answer


def extract_answer(text):
    """GSM8K's '#### n', else the last \\boxed{...}, else 'The answer is ...', else the last number; or None."""
    if "####" in text:
        answer = text.split("####")[-1].strip().split("\n")[0].strip().rstrip(".").strip()
        return answer or None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    said = ANSWER_IS.findall(text)
    if said:
        answer = said[-1].split("\n")[0].strip().rstrip(".").strip().strip("$").strip()
        return answer or None
    numbers = NUMBER.findall(text)
    return numbers[-1].rstrip(",") if numbers else None


def normalize(s):
    """A canonical string for an answer: LaTeX spacing, \\left/\\right, \\text{}, units, percent and thousands
    separators removed; \\dfrac/\\tfrac/\\frac12 written as \\frac{1}{2}; a short 'x =' prefix dropped."""
    s = UNIT_TEXT.sub(r"\1", s.strip().replace("\u2212", "-").replace("\n", ""))
    while TEXT_COMMAND.search(s):
        s = TEXT_COMMAND.sub(r"\1", s)
    for junk in ("\\$", "$", "\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\%", "%"):
        s = s.replace(junk, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\{?\\circ\}?", "", s)  # degrees
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:  # "x = 5", "k=3"
        s = s.split("=")[1]
    s = UNIT_WORDS.sub(r"\1", s.strip())
    s = s.replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,234,567 (a tuple would be in brackets)
        s = s.replace(",", "")
    return s


def to_number(s):
    """An exact Fraction for an integer, decimal, a/b, \\frac{a}{b} or a mixed number 2\\frac{1}{2}; else None."""
    if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)|-?\d+/\d+", s):
        return Fraction(s) if not s.endswith("/0") else None
    m = re.fullmatch(r"(-?)(\d*)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    if m and Fraction(m.group(4)) != 0:
        value = Fraction(m.group(2) or 0) + Fraction(m.group(3)) / Fraction(m.group(4))
        return -value if m.group(1) else value
    return None


def _elements(s):
    """(opening bracket, closing bracket, [elements split at top-level commas]) for a tuple or interval."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    parts, depth, current = [], 0, ""
    for c in s[1:-1]:
        depth += (c in "([{") - (c in ")]}")
        if c == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += c
    return s[0], s[-1], parts + [current]


def _equal(a, b):
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return x == y
    ca, cb = CHOICE.fullmatch(a), CHOICE.fullmatch(b)
    if ca and cb:
        return (ca.group(1) or ca.group(2)).upper() == (cb.group(1) or cb.group(2)).upper()
    ea, eb = _elements(a), _elements(b)
    if ea and eb and ea[:2] == eb[:2] and len(ea[2]) == len(eb[2]) > 1:
        return all(_equal(u, v) for u, v in zip(ea[2], eb[2]))
    return False


def is_equiv(pred, gold):
    """Whether a predicted final answer equals the reference answer (see the module note for what is not)."""
    if pred is None or gold is None:
        return False
    return _equal(normalize(str(pred)), normalize(str(gold)))


def grade(response, gold):
    """The 0/1 reward of a response: 1.0 iff its extracted final answer is equivalent to gold."""
    return float(is_equiv(extract_answer(response), gold))
