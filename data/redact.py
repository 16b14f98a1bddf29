"""Redaction of personal identifiers: e-mail, IP addresses, phone numbers.

Each match is replaced by a placeholder (`<EMAIL>`, `<IP>`, `<PHONE>`) and
counted. The rules lean towards keeping text: a false redaction destroys
technical content (versions, dates, netmasks) while the corpus is public
documentation, so only shapes that are unambiguous identifiers are replaced.

E-mail: `local@domain.tld` (tld of 2+ letters). Kept: the reserved example
  domains of RFC 2606 / 6761 (example.com/.net/.org, *.example, *.invalid,
  *.test, *.localhost), which name nobody.
IPv4: four dotted decimal octets 0-255, not part of a longer dotted number
  (1.2.3.4.5 is a version) and not right after 'v' or 'version '. Kept:
  loopback (127/8), unspecified, link-local, multicast, reserved, the
  documentation ranges (192.0.2/24, 198.51.100/24, 203.0.113/24) and mask-
  shaped values (255.255.255.0, 0.0.0.255): they identify no host.
IPv6: a colon-hex group sequence that `ipaddress` accepts, with at least
  three non-empty groups (so slices like `a[1::2]` and times like 12:30:45
  stay). Kept: loopback, unspecified, link-local, multicast and 2001:db8::/32.
Phone: only explicit shapes: an international number (`+CC` then 7..14 more
  digits in groups split by space, '-', '.' or a parenthesised area code),
  or the North American `(555) 123-4567` / `555-123-4567`. Plain digit runs,
  dates (2024-01-15, 15.01.2024), times and versions (3.11.7) never match.
Not redacted: names, street addresses, MAC addresses, user names, URLs.

Usage:
  text, counts = redact.redact('mail me at jo@mail.net')  # counts['email'] 1
"""

from collections.abc import Sequence
import ipaddress
import re

PLACEHOLDERS = {'email': '<EMAIL>', 'ip': '<IP>', 'phone': '<PHONE>'}
KINDS = tuple(PLACEHOLDERS)

_EMAIL_RE = re.compile(
    r'(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*'
    r'@((?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,})\b')
_RESERVED_DOMAIN_RE = re.compile(
    r'(?:^|\.)(?:example\.(?:com|net|org)|example|invalid|test|localhost)$',
    re.IGNORECASE)
_OCTET = r'(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)'
_IPV4_RE = re.compile(
    rf'(?<![\w.])(?<!version )({_OCTET}(?:\.{_OCTET}){{3}})'
    r'(?![\w]|\.\d)', re.IGNORECASE)
_IPV6_RE = re.compile(
    r'(?<![\w:.])((?:[0-9A-Fa-f]{0,4}:){2,7}'
    r'(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?)(?:%\w+)?(?![\w:])')
_PHONE_RE = re.compile(
    r'(?<![\w+.-])(?:'
    # +CC, then an optional (area), then 2..5 groups of digits.
    r'\+[1-9]\d{0,2}[ .-](?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{1,8}){1,4}'
    # North American (555) 123-4567 and 555-123-4567.
    r'|\(\d{3}\) ?\d{3}-\d{4}|\d{3}-\d{3}-\d{4}'
    r')(?![\w-]|\.\d)')
_DOC_NETS = tuple(ipaddress.ip_network(n) for n in (
    '192.0.2.0/24', '198.51.100.0/24', '203.0.113.0/24', '2001:db8::/32'))


def _is_mask(value: int, bits: int) -> bool:
  """Ones then zeros (a netmask) or zeros then ones (a wildcard mask)."""
  inverted = ~value & ((1 << bits) - 1)
  return inverted & (inverted + 1) == 0 or value & (value + 1) == 0


def _keep_ip(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
  """Whether an address identifies no host (see the module docstring)."""
  if (address.is_loopback or address.is_unspecified or address.is_link_local
      or address.is_multicast or address.is_reserved):
    return True
  if any(address in net for net in _DOC_NETS if net.version == address.version):
    return True
  return address.version == 4 and _is_mask(int(address), 32)


def _email(match: re.Match[str]) -> str | None:
  return None if _RESERVED_DOMAIN_RE.search(match.group(1)) else 'email'


def _ipv4(match: re.Match[str]) -> str | None:
  return None if _keep_ip(ipaddress.IPv4Address(match.group(1))) else 'ip'


def _ipv6(match: re.Match[str]) -> str | None:
  text = match.group(1)
  if sum(1 for group in re.split(r'[:.]', text) if group) < 3:
    return None
  try:
    address = ipaddress.IPv6Address(text)
  except ValueError:
    return None
  return None if _keep_ip(address) else 'ip'


def _phone(match: re.Match[str]) -> str | None:
  digits = sum(c.isdigit() for c in match.group(0))
  if match.group(0).startswith('+') and not 8 <= digits <= 15:
    return None
  return 'phone'


# Applied in this order: e-mails first (their domains may hold digits).
_RULES = ((_EMAIL_RE, _email), (_IPV6_RE, _ipv6), (_IPV4_RE, _ipv4),
          (_PHONE_RE, _phone))


def redact(text: str) -> tuple[str, dict[str, int]]:
  """Replaces identifiers by placeholders.

  Returns:
    (redacted text, {'email': n, 'ip': n, 'phone': n}).
  """
  counts = dict.fromkeys(KINDS, 0)
  for pattern, classify in _RULES:

    def substitute(match: re.Match[str], classify=classify) -> str:
      kind = classify(match)
      if kind is None:
        return match.group(0)
      counts[kind] += 1
      return PLACEHOLDERS[kind]

    text = pattern.sub(substitute, text)
  return text, counts


def redact_documents(
    docs: Sequence[dict[str, str]]
) -> tuple[list[dict[str, str]], dict[str, dict[str, int]]]:
  """`redact` over documents' 'text'; counts per kind and per language.

  Returns:
    (new documents, {kind: {lang: n}}) with zero counts left out.
  """
  out, stats = [], {kind: {} for kind in KINDS}
  for doc in docs:
    text, counts = redact(doc['text'])
    out.append({**doc, 'text': text})
    for kind, n in counts.items():
      if n:
        stats[kind][doc['lang']] = stats[kind].get(doc['lang'], 0) + n
  return out, {kind: dict(sorted(v.items())) for kind, v in stats.items()}
