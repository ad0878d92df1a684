"""In-place redaction of personal data in chat text, before it becomes training data.

Each kind of value is replaced where it stands by a typed placeholder ("[EMAIL]", "[PHONE]"...),
so the sentence around it keeps its shape. Detection runs in stages, most specific first
(secrets and URLs, secrets after a keyword such as "password:", emails, IBANs, cards, IPs,
phones, then the user's blocklist), so a card number is never half-eaten by the phone stage.
Every stage works only on the text *between* placeholders already present, which means
placeholders are never matched again and overlapping matches cannot produce garbage like
"[PH[CARD]".

Numbers are the hard part: most digits in chats are times, dates, prices, versions and counts.
Candidates are found by permissive regexes and then validated in Python (Luhn for cards,
mod-97 and country length for IBANs, `ipaddress` for IPv6, shape rules for phones, and
libphonenumber's numbering plans for a bare run of ten or eleven digits).

Privacy: this module never logs, and never puts a matched value into an exception message.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import phonenumbers

__all__ = ["PLACEHOLDERS", "Redactor", "load_blocklist"]

PLACEHOLDERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "card": "[CARD]",
    "iban": "[IBAN]",
    "ip": "[IP]",
    "secret": "[SECRET]",
    "blocked": "[REDACTED]",
}
_SECRET = PLACEHOLDERS["secret"]

# Text is cut at placeholders; each stage sees only the pieces between them.
_PLACEHOLDER_SPLIT = re.compile("(" + "|".join(map(re.escape, PLACEHOLDERS.values())) + ")")
_DIGIT = re.compile(r"\d")


# -- secrets ----------------------------------------------------------------------------------

# Well-known credential shapes; each is specific enough to redact wherever it appears.
_TOKEN_RE = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|(?<![\w-])(?:"
    r"gh[pousr]_[A-Za-z0-9]{36,255}"                     # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{22,255}"                  # GitHub fine-grained tokens
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"                    # Slack
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"                        # AWS access key ids
    r"|AIza[0-9A-Za-z_-]{35}"                            # Google API keys
    r"|[sr]k_(?:live|test)_[0-9A-Za-z]{16,}"             # Stripe
    r"|sk-(?:proj-)?[A-Za-z0-9_-]{20,}"                  # OpenAI-style keys
    r"|eyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]{8,}"            # JWTs
    r"|[MNO][\w-]{23,27}\.[\w-]{6,7}\.[\w-]{27,40}"      # Discord bot tokens
    r")(?![\w-])"
    r"|(?:(?<=/bot)|(?<![\w-]))\d{8,10}:[\w-]{35}(?![\w-])",  # Telegram bot tokens
    re.DOTALL,
)
# "Bearer <token>": the scheme word stays, the token goes. A token has a digit (so that
# "the bearer of internationalization" is prose) and ends at whitespace or closing punctuation.
_BEARER_RE = re.compile(
    r"(?i)\b(bearer\s+)(?=[\w.~+/-]*\d)[\w.~+/-]{16,}=*(?![^\s,;)\]\"'])"
)

_URL_RE = re.compile(
    r"(?i)(?<![\w.+-])(?:[a-z][a-z0-9+.-]{1,15}://|www\.)[^\s<>\"'`]+"
)
_URL_TRAILING = ".,;:!?'\")]}>"
_QUERY_PARAM_RE = re.compile(r"([?&#])([^=&#?\s]+)=([^&#\s]*)")
# A query parameter whose name looks like it carries a credential.
_SECRET_PARAM_RE = re.compile(
    r"token|secret|passw|signature|credential|session|sessid|api[_-]?key|hmac"
    r"|(?:^|[_.-])(?:key|sig|sid|pass|pwd|pw|auth|otp|jwt)$"
    r"|^(?:code|auth_code|authorization_code|authorization)$",
    re.IGNORECASE,
)


def _trim_url(url: str) -> str:
    """Drop sentence punctuation glued to a URL's end, keeping a ")" the URL itself opened."""
    while url and url[-1] in _URL_TRAILING:
        if url[-1] == ")" and url.count("(") >= url.count(")"):
            break
        url = url[:-1]
    return url


_PLAIN_PARAMS = frozenset({"token_type"})  # OAuth's "token_type=bearer" names no secret


def _secret_param(m: re.Match[str]) -> str:
    sep, name, value = m.groups()
    if value and _SECRET_PARAM_RE.search(name) and name.lower() not in _PLAIN_PARAMS:
        return f"{sep}{name}={_SECRET}"
    return m.group()


def _redact_url(m: re.Match[str]) -> str:
    whole = m.group()
    url = _trim_url(whole)
    tail = whole[len(url):]
    # userinfo password: scheme://user:password@host -> scheme://user:[SECRET]@host
    scheme_end = url.find("://")
    if scheme_end != -1:
        start = scheme_end + 3
        stop = len(url)
        for ch in "/?#":
            i = url.find(ch, start)
            if i != -1:
                stop = min(stop, i)
        at = url.rfind("@", start, stop)
        if at != -1:
            colon = url.find(":", start, at)
            if colon != -1 and colon + 1 < at:
                url = f"{url[: colon + 1]}{_SECRET}{url[at:]}"
    if "=" in url:
        url = _QUERY_PARAM_RE.sub(_secret_param, url)
    return url + tail


def _redact_secrets(text: str) -> str:
    text = _TOKEN_RE.sub(_SECRET, text)
    text = _BEARER_RE.sub(lambda m: m.group(1) + _SECRET, text)
    if "://" in text or "www." in text.lower():
        text = _URL_RE.sub(_redact_url, text)
    return text


# -- secrets introduced by a keyword ----------------------------------------------------------

# "password: x", "my pin is x", "wifi pass: x", "pwd=x", "DB_PASSWORD=x": the value goes and the
# keyword stays, so the clone still learns that passwords come up, not what they are.
# Strong keywords name a password and nothing else: after ":" or "=" even a plain word is taken
# for the value. Weak ones ("pin", "token", "secret", "pass") also name everyday things, so their
# value must look like a secret (_SECRET_SHAPE) whatever the phrasing.
_ID_PART = r"(?:secret|passw(?:or)?d|pwd|passphrase|token|api_?key|(?:access|private|secret)_?key)"
_STRONG_KW = (
    r"pass(?:word|wd|phrase|code)s?|pwd|pw"
    r"|(?:wi-?fi|wlan|router|network|guest)\s+(?:pass(?:word|wd|code|phrase)?|pwd|pw|key)"
    r"|mot\s+de\s+passe|mdp|passwort|kennwort|contraseña|senha|wachtwoord|lösenord(?:et)?"
    r"|adgangskoden?|passord(?:et)?|salasana|has[łl]o|heslo|jelszó|şifre|пароль"
    # identifiers from config files and shells: DB_PASSWORD, aws_secret_access_key, api_key
    rf"|(?=[a-z0-9]*_)(?:[a-z0-9]+_)*{_ID_PART}(?:_[a-z0-9]+)*"
    r"|(?-i:(?:client|api|access|secret|private|auth|refresh|db)(?:Secret|Key|Token|Password))"
)
_WEAK_KW = (
    r"pass|pin(?:[\s-]*code)?|secret(?:\s+key)?|client\s+secret|api[\s-]?key|(?:access|private)\s+key"
    r"|(?:(?:access|auth|bot|api|refresh|session)\s+)?token"
    r"|(?:door|gate|alarm|garage|safe|entry|access)\s+code"
)
# "the password for the wifi is x": a few words may stand between the keyword and "is" or ":".
_BRIDGE = r"\s+(?:for|of|on|at|in|de|del|du|für|pour|para|da|do|van|för)(?:\s+[^\s.,;:!?=]+){1,3}"
_VERB = r"(?:\s+(?:is|was|are|were|will\s+be|ist|war|est|était|es|era|é|è|är|er)|['’]s)"
_KW_RE = re.compile(
    r"(?:(?<=[\s\"'`(\[{,;*>])|(?<=--)|^)"  # starts a word, not inside a URL or identifier
    rf"(?:(?P<strong>{_STRONG_KW})|(?P<weak>{_WEAK_KW}))(?![\w-])[\"'`*]*"
    rf"(?:(?:{_BRIDGE})?(?:(?P<sep>\s*(?::=|=>|->|[:=])(?!//)\**\s*|\s+[-–—]\s+)"  # "**pwd:** x", "pin - x"
    rf"|(?P<verb>{_VERB}(?:\s+(?:now|still|just))?(?:\s*:\s*|\s+)))"
    r"|(?P<adj>[ \t]+))"
    r"(?P<val>(?P<q>[\"'`“‘«])(?P<qv>[^\n\"'`”’»]{1,100})[\"'`”’»]|[^\s\"'`“‘«]\S{0,199})",
    re.IGNORECASE,
)
# Cheap test first, on the lowered text: most messages name none of the keywords, and a
# case-insensitive alternation costs five times as much as this one.
_KW_HINT = re.compile(
    r"p(?:ass|w|in)|s(?:ecret|enha|alasana)|token|k(?:ey|ennwort)|co(?:de|ntrase)|mdp|wachtwoord"
    r"|lösenord|h(?:as[łl]o|eslo)|jelsz|şifre|пароль"
)
_VALUE_TRAILING = ".,;:)]}>\"'”’»"
# A digit, a symbol or an inner capital ("hunter2", "Tr0ub4dor&3", "CorrectHorse").
_SECRET_SHAPE = re.compile(r"\d|[^\w\s'’-]|_|[a-z][A-Z]")
# Money, percentages, dates, times, ranges and versions ("the pass is $120", "pin: 10:30");
# a bare run of digits is a PIN.
_NOT_SECRET = re.compile(r"[$€£¥]\d[\d.,]*|\d[\d.,]*[$€£¥%]|\d+(?:[.,:/-]\d+)+|v\d+(?:\.\d+)*")
# A plain word is a password only where it ends the clause ("wifi password: swordfish.").
_CLAUSE_END = re.compile(r"[)\]}>\"'”’»]*(?:\s*$|[ \t]*\n|[,;]|[.!?](?:\s|$))")
# Words that end "password: ..." in prose (shorter ones never count as a value).
_PLAIN_VALUES = frozenset({
    "same", "none", "null", "empty", "blank", "unknown", "reset", "changed", "required", "incorrect",
    "wrong", "expired", "hidden", "please", "check", "below", "above", "attached", "sent", "your",
    "their", "this", "that", "here", "there", "with", "bearer", "default", "forgot", "forgotten",
    "needed", "optional", "redacted", "removed", "deleted", "private",
})


def _keyword_value_span(m: re.Match[str]) -> tuple[int, int] | None:
    """Where the secret after a keyword is, or None when the words after it are prose."""
    keyword = m.group("strong") or m.group("weak")
    lowered = keyword.lower()
    # ":" or "=" announce a value, also after a verb ("password is: x")
    announced = m.group("sep") is not None or ":" in (m.group("verb") or "")
    if m.group("adj") is not None and not (m.group("strong") or lowered.startswith("pin")):
        return None  # "token 12345", "secret santa": only password words and PINs go bare
    if lowered == "pass" and not announced:
        return None  # "the bus pass is $120"
    if m.group("q"):
        return m.span("qv")
    value = m.group("val").rstrip(_VALUE_TRAILING)
    start = m.start("val")
    # An "=" or ":" closing the value is its keyword's ("pin code=" before a placeholder).
    core = value.strip("()[]{}<>!?.,;:=")
    if len(core) < 4 or _NOT_SECRET.fullmatch(core):
        return None
    if _SECRET_SHAPE.search(core) is None:
        plain_ok = (
            m.group("strong") is not None
            and announced
            and core.lower() not in _PLAIN_VALUES
            and _CLAUSE_END.match(m.string, start + len(value)) is not None
        )
        if not plain_ok:
            return None
    return start, start + len(value)


def _redact_keyword_secrets(text: str) -> str:
    if _KW_HINT.search(text.lower()) is None:
        return text
    out: list[str] = []
    done = search_from = 0
    while (m := _KW_RE.search(text, search_from)) is not None:
        span = _keyword_value_span(m)
        if span is None:
            # Prose after the keyword; it may itself hold a keyword ("pass pwd=x").
            search_from = m.start("val")
            continue
        out += [text[done : span[0]], _SECRET]
        done = search_from = span[1]
    if not out:
        return text
    out.append(text[done:])
    return "".join(out)


# -- emails -----------------------------------------------------------------------------------

_EMAIL_RE = re.compile(
    r"(?<![\w.%+/-])"
    r"[\w%+-](?:[\w.%+-]*[\w%+-])?"
    r"@(?:[^\W_][\w-]*\.)+[^\W\d_]{2,}"
    r"(?![\w-]|\.[^\W_])"
)


def _redact_emails(text: str) -> str:
    return _EMAIL_RE.sub(PLACEHOLDERS["email"], text) if "@" in text else text


# -- IBANs ------------------------------------------------------------------------------------

# Official IBAN lengths (SWIFT registry); an IBAN from a listed country must have exactly this.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
# Country code, check digits, then alphanumerics with optional single spaces (groups of 4).
_IBAN_SHAPE = r"(?<![\w-])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9_])"
# IBANs are typed in lower case too ("gb82 west 1234 ..."). Explicit ASCII classes, not
# re.IGNORECASE, under which [a-z] also matches "ı" and "ſ".
_IBAN_RE = re.compile(r"(?<![\w-])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11,30}(?![A-Za-z0-9_])")
# The number stages after the IBAN one also leave upper-case IBAN-shaped text alone: one that
# failed its check stays as written instead of having its digits taken for a card or phone.
# Not lower case: "cs50 lecture 3 at 020 7946 0958" is prose with a phone in it.
_PLACEHOLDER_OR_IBAN_SPLIT = re.compile(
    "(" + "|".join(map(re.escape, PLACEHOLDERS.values())) + "|" + _IBAN_SHAPE + ")"
)


def _iban_ok(compact: str) -> bool:
    expected = _IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) != expected:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _redact_iban_match(m: re.Match[str]) -> str:
    s = m.group()
    # The regex may have run on into a following upper-case word: try each cut at a space
    # (or the end), longest first.
    cuts = [len(s)] + [i for i in range(len(s) - 1, 0, -1) if s[i] == " "]
    # Lower-case runs are mostly prose: only countries with a registered length can match, so
    # that a chance mod-97 hit on "ab12 some words here" is not taken for an IBAN.
    known_only = not s.isupper()
    for cut in cuts:
        compact = s[:cut].replace(" ", "").upper()
        if known_only and compact[:2] not in _IBAN_LENGTHS:
            break
        if 15 <= len(compact) <= 34 and _iban_ok(compact):
            return PLACEHOLDERS["iban"] + s[cut:]
    return s


def _redact_ibans(text: str) -> str:
    return _IBAN_RE.sub(_redact_iban_match, text)


# -- cards ------------------------------------------------------------------------------------

# 13-19 digits, bare or in groups (first group of 4) split by one consistent space or dash.
# Not glued to ids, decimals, URL paths or query values, or Discord mentions (<@123...>).
_CARD_RE = re.compile(
    r"(?<![\w@&/.,+=#-])"
    r"(?:\d{13,19}|\d{4}([ -])\d{3,6}(?:\1\d{3,6}){0,3}(?:\1\d{1,6})?)"
    r"(?![\w]|[.,-]\d)"
)
_GROUP_RE = re.compile(r"\d+")
_LUHN_DOUBLE = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        total += _LUHN_DOUBLE[d] if i % 2 else d
    return total % 10 == 0


def _is_card(groups: list[str]) -> bool:
    digits = "".join(groups)
    if not 13 <= len(digits) <= 19 or digits[0] == "0":
        return False
    # "2019 2020 2021 2022" is a list of years that happens to pass Luhn one time in ten.
    if len(groups) > 1 and all(len(g) == 4 and 1900 <= int(g) <= 2099 for g in groups):
        return False
    return _luhn_ok(digits)


def _redact_card_match(m: re.Match[str]) -> str:
    s = m.group()
    # A card starts where the run starts ("0049 1234 5678 9012 345" is a phone, not "0049 " and
    # a card); it may stop early, before digits that were typed after it.
    ends = [g.end() for g in _GROUP_RE.finditer(s)]
    for end in reversed(ends):
        if _is_card(_GROUP_RE.findall(s, 0, end)):
            return PLACEHOLDERS["card"] + s[end:]
    return s


def _redact_cards(text: str) -> str:
    return _CARD_RE.sub(_redact_card_match, text)


# -- IP addresses -----------------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Exactly four octets: "v1.2.3.4" and "1.2.3.4.5" are versions, not addresses; after a "+" that
# starts a word, "+1.10.10.100" is an international phone number (the phone rule's).
_IPV4_RE = re.compile(rf"(?<![\w.])(?<!^\+)(?<!\s\+)(?<!\(\+)(?:{_OCTET}\.){{3}}{_OCTET}(?!\w|\.\d)")
# A permissive IPv6 candidate (two colons at least, optional embedded IPv4 and zone),
# then checked by `ipaddress`: "10:30" and "22:01:05" are times and fail that check.
_IPV6_RE = re.compile(
    r"(?<![\w:.])"
    r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}"
    r"(?:(?<=:)(?:\d{1,3}\.){3}\d{1,3})?"
    r"(?:%[\w.]+)?"
    r"(?![\w:]|\.\d)"
)
_HEX_GROUP = re.compile(r"[0-9A-Fa-f]+")


def _redact_ipv6_match(m: re.Match[str]) -> str:
    s = m.group()
    # Two hex groups and a digit at least: "::1" is not personal, "ab::cd" is prose.
    if len(_HEX_GROUP.findall(s.split("%", 1)[0])) < 2 or not _DIGIT.search(s):
        return s
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return s
    return PLACEHOLDERS["ip"]


def _redact_ips(text: str) -> str:
    if ":" in text:
        text = _IPV6_RE.sub(_redact_ipv6_match, text)
    if "." in text:
        text = _IPV4_RE.sub(PLACEHOLDERS["ip"], text)
    return text


# -- phone numbers ----------------------------------------------------------------------------

# A run of digit chunks ("(0)", "(202)", "555") joined by single separators (space, dot,
# dash, or nothing next to a parenthesis), optionally after "+". Validated by _is_phone.
_PHONE_CHUNK = r"(?:\(\d{1,5}\)|\d{1,15})"
_PHONE_RE = re.compile(
    r"(?<![\w+.,/@#$€£¥%&-])"
    rf"\+?{_PHONE_CHUNK}(?:(?:[ .-]|(?<=\))|(?=\()){_PHONE_CHUNK})*"
    r"(?!\w|[.,:/-]\d)"
)
_CHUNK_RE = re.compile(r"\(\d+\)|\d+")


def _looks_like_range(a: str, b: str) -> bool:
    return int(a) < int(b) and (b.endswith("00") or (a.endswith("0") and b.endswith("0")))


def _is_phone(plus: bool, chunks: list[str], seps: list[str]) -> bool:
    groups = [c.strip("()") for c in chunks]
    digits = "".join(groups)
    n = len(digits)
    if n < 7:
        return False
    if plus:  # international, E.164: up to 15 digits, country codes never start with 0
        return n <= 15 and digits[0] != "0"
    if groups[0].startswith("00"):  # international with the 00 exit code
        return 10 <= n <= 17 and digits[2] != "0"
    parens = [c.startswith("(") for c in chunks]
    shape = [len(g) for g in groups]
    # North American: (202) 555-0143, 202-555-0143, 202.555.0143, 1-800-555-0199
    nanp = shape[-3:] == [3, 3, 4] and (len(shape) == 3 or (shape == [1, 3, 3, 4] and digits[0] == "1"))
    if nanp:
        k = len(shape) - 3
        if parens[k] and not any(parens[k + 1 :]):
            return seps[k] in ("", " ") and seps[k + 1] in (" ", "-", ".") and (
                k == 0 or seps[0] in (" ", "-")
            )
        return not any(parens) and len(set(seps)) == 1 and seps[0] in (" ", "-", ".")
    # Local 555-0143; a range like "100-1000" or "150-2500" goes up to a round number.
    if shape == [3, 4] and seps == ["-"] and not any(parens):
        return not _looks_like_range(*groups)
    # National with a trunk 0: 020 7946 0958, 06 12 34 56 78, (030) 1234567, 0612345678.
    if digits[0] == "0" and digits[1] != "0" and not any(parens[1:]):
        if len(groups) == 1:  # unseparated: only a mobile-length run, and not binary
            return not parens[0] and 10 <= n <= 12 and len(set(digits)) > 2
        rest = seps[1:] if parens[0] else seps
        return (
            9 <= n <= 12
            and 2 <= shape[0] <= 5
            and min(shape[1:]) >= 2
            and (not parens[0] or seps[0] in ("", " "))
            and len(set(rest)) <= 1
            and "" not in rest
        )
    return False


# A bare run of 10-11 digits (4155552671) has no shape to go by: it is checked against
# libphonenumber's numbering plans of the regions whose numbers are written without a trunk 0
# (those with one are the shape rules' business): NANP (US, Canada...), and mobiles in India
# (10 digits) and China (11).
# About 40% of random 10-digit runs fit NANP's plan: a run typed after one of these words is an id.
_ID_BEFORE = re.compile(
    r"(?i)\b(?:order|ticket|invoice|tracking|ref|reference|id|isbn|sku|item|issue|case|build"
    r"|commit|serial|transaction|txn|booking|confirmation|pnr|receipt|parcel|shipment)"
    r"(?:\s*(?:no\.?|nr\.?|number|num|#))?\W{0,3}$"
)
_MOBILE_TYPES = (phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE)
# By length: (country code, leading digits it drops, leading digits its numbers may have,
# whether only mobiles count). Indian mobiles start with 6-9 (the plan also has 1600..., where
# Unix timestamps of 2020 live); eleven digits are NANP's country code 1 and ten digits, or a
# Chinese mobile 13x-19x.
_BARE_PLANS: dict[int, tuple[tuple[int, int, str, bool], ...]] = {
    10: ((1, 0, "23456789", False), (91, 0, "6789", True)),
    11: ((1, 1, "1", False), (86, 0, "1", True)),
}
_SAME_DIGIT_RUN = re.compile(r"(\d)\1{5}")


@functools.lru_cache(maxsize=4096)  # a chat repeats its numbers; a check costs ~15 µs
def _is_national_phone(digits: str) -> bool:
    # Round and repetitive numbers are amounts or placeholders: 2500000000, 6000000001.
    if len(set(digits)) <= 2 or digits.endswith("0000") or _SAME_DIGIT_RUN.search(digits):
        return False
    for country, drop, leading, mobile_only in _BARE_PLANS[len(digits)]:
        if digits[0] not in leading:
            continue
        # Built, not parsed: the digits are already clean, and parse() costs twice the check.
        # is_valid_number tries every region of the country code (416 is Toronto, not US).
        number = phonenumbers.PhoneNumber(country_code=country, national_number=int(digits[drop:]))
        if phonenumbers.is_valid_number(number) and (
            not mobile_only or phonenumbers.number_type(number) in _MOBILE_TYPES
        ):
            return True
    return False


def _is_bare_phone(text: str, start: int, chunk: str) -> bool:
    """Whether `chunk`, a run of digits alone at text[start:], is a national number."""
    if not (10 <= len(chunk) <= 11 and chunk.isascii() and chunk.isdigit()):
        return False
    if start and text[start - 1] == "=":  # a query value: "?id=4155552671"
        return False
    return _ID_BEFORE.search(text, max(0, start - 30), start) is None and _is_national_phone(chunk)


def _redact_phone_match(m: re.Match[str]) -> str:
    s = m.group()
    spans = [(c.start(), c.end()) for c in _CHUNK_RE.finditer(s)]
    if sum(ch.isdigit() for ch in s) < 7:
        return s
    chunks = [s[a:b] for a, b in spans]
    seps = [s[spans[k][1] : spans[k + 1][0]] for k in range(len(spans) - 1)]
    plus = s.startswith("+")
    out, pos, i = [], 0, 0
    # Leftmost-longest window of chunks that is a phone; inside a run, a window may only
    # start or stop at a space (so "555-0143-22" is not cut into a phone and a tail).
    while i < len(spans):
        if i == 0 or seps[i - 1] == " ":
            for j in range(min(len(spans), i + 16) - 1, i - 1, -1):
                if j < len(spans) - 1 and seps[j] != " ":
                    continue
                if _is_phone(plus and i == 0, chunks[i : j + 1], seps[i:j]) or (
                    j == i and not (plus and i == 0)
                    and _is_bare_phone(m.string, m.start() + spans[i][0], chunks[i])
                ):
                    start = 0 if (plus and i == 0) else spans[i][0]
                    out.append(s[pos:start])
                    out.append(PLACEHOLDERS["phone"])
                    pos = spans[j][1]
                    i = j
                    break
        i += 1
    if pos == 0:
        return s
    out.append(s[pos:])
    return "".join(out)


def _redact_phones(text: str) -> str:
    return _PHONE_RE.sub(_redact_phone_match, text)


# -- blocklist --------------------------------------------------------------------------------

_WORD_EDGE = r"\w\u0300-\u036f"  # a word character, or a combining accent continuing a word


def _blocklist_regex(entries: Iterable[str]) -> re.Pattern[str] | None:
    """One regex for all entries, built as a trie so that thousands of names stay fast.

    Whitespace inside an entry matches any run of whitespace. At each branching point the
    longer continuation is tried first, so "Anna Maria" wins over "Anna".
    """
    trie: dict = {}
    for entry in entries:
        words = entry.split()
        if not words:
            continue
        node = trie
        for k, word in enumerate(words):
            if k:
                node = node.setdefault(" ", {})
            for ch in word:
                low = ch.lower()
                node = node.setdefault(low if len(low) == 1 else ch, {})
        node[None] = {}
    if not trie:
        return None

    def build(node: dict) -> str:
        alts = []
        for atom, child in node.items():
            if atom is None:
                continue
            alts.append((r"\s+" if atom == " " else re.escape(atom)) + build(child))
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if None in node else body

    return re.compile(rf"(?<![{_WORD_EDGE}])(?:{build(trie)})(?![{_WORD_EDGE}])", re.IGNORECASE)


# -- the redactor -----------------------------------------------------------------------------


class Redactor:
    """Replace personal data in text by typed placeholders; see PLACEHOLDERS for the types."""

    def __init__(self, blocklist: Iterable[str] = ()) -> None:
        self._blocked = _blocklist_regex(blocklist)
        # (type, stage, numeric): order matters, most specific first. Numeric stages run only
        # on text with a digit, and skip IBAN-shaped text as well as placeholders.
        self._stages: list[tuple[str, Callable[[str], str], bool]] = [
            ("secret", _redact_secrets, False),
            ("secret", _redact_keyword_secrets, False),
            ("email", _redact_emails, False),
            ("iban", _redact_ibans, False),
            ("card", _redact_cards, True),
            ("ip", _redact_ips, True),
            ("phone", _redact_phones, True),
        ]
        if self._blocked is not None:
            sub = self._blocked.sub
            self._stages.append(("blocked", lambda t: sub(PLACEHOLDERS["blocked"], t), False))

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        """Return `text` with personal data replaced in place, and how many of each type."""
        counts: Counter[str] = Counter()
        out = self._pass(text, counts)
        # A redaction can change what a neighbour looks like ("Anna+44 20 7946 0958" only
        # shows its phone once "Anna" is gone): repeat until nothing changes, so redacting
        # the output again is always a no-op. Each pass that changes something shrinks the
        # unredacted text, so this ends; almost every message needs a single pass.
        while out != text:
            text = out
            out = self._pass(text, counts)
        return out, counts

    def _pass(self, text: str, counts: Counter[str]) -> str:
        has_digit = _DIGIT.search(text) is not None
        for kind, stage, numeric in self._stages:
            if numeric:
                if not has_digit:
                    continue
                parts = _PLACEHOLDER_OR_IBAN_SPLIT.split(text)
            elif kind == "iban" and not has_digit:
                continue
            else:
                parts = _PLACEHOLDER_SPLIT.split(text) if "[" in text else [text]
            placeholder = PLACEHOLDERS[kind]
            changed = False
            for i in range(0, len(parts), 2):  # odd indexes are placeholders: left alone
                piece = parts[i]
                if piece:
                    new = stage(piece)
                    if new != piece:
                        # A piece holds no placeholder before the stage, so this counts
                        # exactly the ones the stage inserted.
                        counts[kind] += new.count(placeholder)
                        parts[i] = new
                        changed = True
            if changed:
                text = "".join(parts)
        return text


def load_blocklist(path: Path) -> list[str]:
    """Read a blocklist file: one word or name per line, '#' starts a comment, UTF-8."""
    try:
        raw = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    entries = []
    for line in raw.splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            entries.append(entry)
    return entries
