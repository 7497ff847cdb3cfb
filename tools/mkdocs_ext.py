"""The docs site's two small extensions (configured in mkdocs.yml).

- ``HidePrivate`` (a griffe extension for mkdocstrings): parameters whose names start
  with ``_`` (private seams such as ``VioletClient(_transport=...)``) and private base
  classes are left out of the API reference.
- ``HidePrivate`` also shows an attrs field's default, not its ``attrs.field(...)`` call.
- ``on_page_content`` (an mkdocs hook): the Sphinx roles the docstrings use
  (``:meth:`aclose```, ``~module.name``) are shown as plain code, not as raw ``:meth:``
  text or a private module's path, and a
  cross-reference's tooltip names the public path, not the private module.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:meth|class|func|attr|exc|data|mod|obj):(?=<code)")
# A role's ``~`` ("show the last name only"): ``~violet_async._journal_index.same_money``
# reads ``same_money``, as Sphinx shows it.
_TILDE = re.compile(r"<code>~(?:\w+\.)+(\w+)</code>")
# A cross-reference's tooltip names where a public name is defined (a private module).
_TITLE = re.compile(r'title="[^"]*"')
_PRIVATE_MODULE = re.compile(r"\._[a-z]\w*(?=\.\w)")
# A private sentinel type in a union annotation: ``str | _Now | None``.
_PRIVATE_IN_UNION = re.compile(r"\s*\|\s*_[A-Za-z]\w*(?![\w.])|(?<![\w.])_[A-Za-z]\w*\s*\|\s*")
# The plumbing a public class inherits from: implementation, not API.
_HIDDEN_BASES = {"RequestPlumbing"}


class HidePrivate(griffe.Extension):
    """Drop private parameters and implementation base classes from the reference."""

    def on_function_instance(self, *, func: griffe.Function, **kwargs: Any) -> None:
        for name in [p.name for p in func.parameters if p.name.startswith("_")]:
            del func.parameters[name]
        for param in func.parameters:
            # The "not given" sentinel: a field left out is not sent, like None (where
            # None is allowed); elsewhere the default reads UNSET: "left as it is".
            if "_Unset" in str(param.annotation):
                shown = str(param.annotation).replace("_Unset | ", "").replace(" | _Unset", "")
                param.annotation = shown
                if "None" in shown:
                    param.default = "None"
            elif _PRIVATE_IN_UNION.search(str(param.annotation)):
                # Another private sentinel (FakeViolet's "now"): its docstring says
                # what the default means.
                param.annotation = _PRIVATE_IN_UNION.sub("", str(param.annotation))

    def on_class_instance(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        cls.bases = [b for b in cls.bases if str(b).rsplit(".", 1)[-1] not in _HIDDEN_BASES]

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        """An attrs field shows its default (``= None``), not the ``attrs.field(...)``
        call with its private converters and validators; one made per instance by a
        factory shows none."""
        value = attr.value
        if not isinstance(value, griffe.ExprCall) or str(value.function) != "attrs.field":
            return
        defaults = [
            a.value
            for a in value.arguments
            if isinstance(a, griffe.ExprKeyword) and a.name == "default"
        ]
        attr.value = defaults[0] if defaults else None


def on_page_content(html: str, **kwargs: Any) -> str:
    """mkdocs hook: ``:meth:<code>x</code>`` becomes ``<code>x</code>``, and
    ``<code>~a.b.c</code>`` becomes ``<code>c</code>``."""
    return _TILDE.sub(r"<code>\1</code>", _ROLE.sub("", html))


def on_post_page(html: str, **kwargs: Any) -> str:
    """mkdocs hook, once cross-references are resolved: their tooltips say
    ``violet_async.Timeouts``, not ``violet_async._transport.Timeouts``."""
    return _TITLE.sub(lambda title: _PRIVATE_MODULE.sub("", title[0]), html)
