"""A griffe extension for jaxbn's site: the docstrings' reST markup, in Markdown.

jaxbn's docstrings are Google style with reST inline markup (``code``, :func:`name`,
:class:`~path.Name`), which Python's ``help()`` and IDEs show as written. For the site this
extension rewrites each docstring after griffe loads the package: double backticks become
Markdown code, and a role becomes a link to the object's API entry (a cross-reference that
stays plain code when the object has no entry, e.g. a name of another library). Lines of
doctest examples (``>>>`` and their output) are left alone. mkdocs.yml loads it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):`(~?)([^`]+)`")
_LITERAL = re.compile(r"(?<!`)``([^`]+?)``(?!`)")


def _resolve(name: str, obj: griffe.Object, collection: Any) -> str | None:
  """The full path of ``name`` as written in ``obj``'s docstring, or None."""
  name = name.removesuffix("()")
  scopes = []
  scope: Any = obj
  while scope is not None:
    scopes.append(scope.path)
    scope = scope.parent
  candidates = [name] + [f"{s}.{name}" for s in scopes] + [f"jaxbn.{name}"]
  for path in candidates:
    try:
      collection[path]
    except (KeyError, ValueError, griffe.AliasResolutionError):
      continue
    return path
  return None


def _rewrite(text: str, obj: griffe.Object, collection: Any) -> str:
  def role(m: re.Match) -> str:
    short, name = m.group(1), m.group(2)
    shown = name.rsplit(".", 1)[-1] if short else name
    path = _resolve(name, obj, collection)
    code = f"<code>{shown}</code>"
    if path is None:
      return code
    return f'<autoref identifier="{path}" optional>{code}</autoref>'

  out = []
  in_example = False
  for line in text.split("\n"):
    stripped = line.strip()
    if stripped.startswith((">>>", "...")):
      in_example = True
    elif not stripped:
      in_example = False
    if in_example:
      out.append(line)
      continue
    out.append(_LITERAL.sub(r"`\1`", _ROLE.sub(role, line)))
  return "\n".join(out)


class RstRoles(griffe.Extension):
  """Rewrites every docstring of the loaded package (see the module's docstring)."""

  def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
    seen: set[str] = set()

    def visit(obj: griffe.Object) -> None:
      if obj.path in seen:
        return
      seen.add(obj.path)
      if obj.docstring is not None:
        obj.docstring.value = _rewrite(obj.docstring.value, obj, loader.modules_collection)
      for member in obj.members.values():
        if not member.is_alias:
          visit(member)  # type: ignore[arg-type]

    visit(pkg)
