"""Sphinx pieces of treeguard's documentation.

- ``treeguard-cli``: the command-line reference, rendered from the very parser that
  ``treeguard`` runs (usage, description and options of every subcommand, and the exit
  statuses of its epilog as a table), so the reference cannot drift from ``--help``.
- Every name in ``treeguard.__all__`` must be documented as ``treeguard.NAME``: a public name
  missing from the API reference fails the build.
- The type aliases of ``treeguard._types`` re-exported as ``treeguard.NAME`` get the comment
  written above their definition (autodoc looks for it in ``treeguard`` itself), and a
  dataclass field's ``<factory>`` default (which Sphinx cannot parse) shows as ``...``.
- A reference to a type alias (``Target``, ``Scope``, ``BackendName``: documented as data) is
  resolved to it even when written as a class, as autodoc writes annotations.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging
from sphinx.util.nodes import make_refnode

logger = logging.getLogger(__name__)

#: The rows of an epilog's status list: two spaces, the code, the meaning; a meaning may go
#: on over lines indented further.
_STATUS = re.compile(r"^  (\d+) +(.*)$")
_MORE = re.compile(r"^ {4,}(\S.*)$")


def _parser() -> argparse.ArgumentParser:
    from treeguard import _cli

    return _cli._parser()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def statuses(epilog: str) -> list[tuple[str, str]]:
    """``(status, meaning)`` of every status an epilog lists, in its order."""
    rows: list[tuple[str, str]] = []
    for line in epilog.splitlines():
        if m := _STATUS.match(line):
            rows.append((m[1], m[2]))
        elif rows and (m := _MORE.match(line)):
            rows[-1] = (rows[-1][0], f"{rows[-1][1]} {m[1]}")
    return rows


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar if isinstance(action.metavar, str) else action.dest
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    if action.metavar is not None:
        metavar = str(action.metavar)
    elif action.choices is not None:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        metavar = action.dest.upper()
    return ", ".join(f"{option} {metavar}" for option in action.option_strings)


def _table(head: tuple[str, str], rows: list[tuple[nodes.Node, nodes.Node]]) -> nodes.table:
    table = nodes.table()
    group = nodes.tgroup(cols=2)
    table += group
    group += nodes.colspec(colwidth=30)
    group += nodes.colspec(colwidth=70)
    thead = nodes.thead()
    group += thead
    thead += nodes.row("", *(nodes.entry("", nodes.paragraph(text=h)) for h in head))
    body = nodes.tbody()
    group += body
    for left, right in rows:
        body += nodes.row("", nodes.entry("", left), nodes.entry("", right))
    return table


def _options(parser: argparse.ArgumentParser) -> nodes.table | None:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        left = nodes.paragraph("", "", nodes.literal(text=_invocation(action)))
        rows.append((left, nodes.paragraph(text=action.help or "")))
    return _table(("argument", "meaning"), rows) if rows else None


class CliReference(Directive):
    """Renders ``treeguard``'s parser: the command, then a section per subcommand."""

    has_content = False

    def _section(self, title: str, parser: argparse.ArgumentParser) -> nodes.section:
        section = nodes.section(ids=[nodes.make_id(title)])
        self.state.document.note_implicit_target(section)
        section += nodes.title(text=title)
        section += nodes.literal_block(text=parser.format_usage().strip())
        if parser.description:
            section += nodes.paragraph(text=" ".join(parser.description.split()))
        options = _options(parser)
        if options is not None:
            section += options
        return section

    @staticmethod
    def _statuses(lines: list[str]) -> nodes.table:
        return _table(
            ("status", "meaning"),
            [
                (nodes.paragraph(text=code), nodes.paragraph(text=meaning))
                for code, meaning in statuses("\n".join(lines))
            ],
        )

    def run(self) -> list[nodes.Node]:
        parser = _parser()
        top = self._section(parser.prog, parser)
        epilog = parser.epilog or ""
        if not statuses(epilog):
            raise self.error("treeguard-cli: no exit statuses found in the parser's epilog")
        top += nodes.paragraph(text="Exit statuses, the same for every subcommand:")
        # The epilog in its order: runs of statuses become tables, the prose between
        # them (what ``freeze`` passes through) paragraphs.
        rows = []
        prose: list[str] = []
        for line in epilog.splitlines()[1:]:  # after "exit status:"
            if _STATUS.match(line) or (rows and _MORE.match(line)):
                if prose:
                    top += nodes.paragraph(text=" ".join(prose))
                    prose = []
                rows.append(line)
                continue
            if rows:
                top += self._statuses(rows)
                rows = []
            prose.append(line.strip())
        if prose:
            top += nodes.paragraph(text=" ".join(prose))
        if rows:
            top += self._statuses(rows)
        sections: list[nodes.Node] = [top]
        for name, sub in _subcommands(parser).items():
            sections.append(self._section(f"{parser.prog} {name}", sub))
        return sections


def _check_api(app: Sphinx, env: BuildEnvironment) -> None:
    import treeguard

    documented = env.get_domain("py").objects  # type: ignore[attr-defined]
    for name in treeguard.__all__:
        full = f"treeguard.{name}"
        if full not in documented and not name == "cgroup":
            logger.warning("%s is public (in treeguard.__all__) but not documented", full)
    if "treeguard.cgroup" not in documented:
        logger.warning("treeguard.cgroup is public but not documented")


def _alias(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: nodes.Element
) -> nodes.Element | None:
    """A class reference that names something documented under ``treeguard.`` by another
    kind (a type alias is data), or a member of ``treeguard.errors`` (documented where users
    import it, as ``treeguard.NAME``)."""
    if node.get("refdomain") != "py" or node.get("reftype") not in ("class", "exc", "obj"):
        return None
    target = node["reftarget"].split(".")[-1]
    objects = env.get_domain("py").objects  # type: ignore[attr-defined]
    found = objects.get(f"treeguard.{target}")
    if found is None:
        return None
    return make_refnode(
        app.builder, node["refdoc"], found.docname, found.node_id, contnode, found.node_id
    )


def _alias_comment(
    app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    if what != "data" or not name.startswith("treeguard.") or name.count(".") != 1:
        return
    from sphinx.pycode import ModuleAnalyzer

    docs = ModuleAnalyzer.for_module("treeguard._types").find_attr_docs()
    comment = docs.get(("", name.split(".")[1]))
    if comment:
        lines[:] = [*comment, ""]


def _factory_default(
    app: Sphinx,
    what: str,
    name: str,
    obj: object,
    options: object,
    signature: str | None,
    annotation: str | None,
) -> tuple[str | None, str | None] | None:
    if signature and " = <factory>" in signature:
        return signature.replace(" = <factory>", " = ..."), annotation
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("treeguard-cli", CliReference)
    app.connect("env-check-consistency", _check_api)
    app.connect("missing-reference", _alias)
    app.connect("autodoc-process-docstring", _alias_comment)
    app.connect("autodoc-process-signature", _factory_default)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
