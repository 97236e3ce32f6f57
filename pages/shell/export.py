"""The sidebar's footer: the link that reopens exactly this view, and the run manifest."""

from __future__ import annotations

import json
import platform
from typing import Any

import streamlit as st
import torch

import noln_core
from noln_core import RunResult
from pages.shell.links import share_link
from pages.shell.state import state


def share_url() -> str:
    try:
        url = st.context.url or ""
        base = url.split("?", 1)[0].rsplit("/", 1)[0] if url.count("/") > 2 else url
    except Exception:  # older Streamlit, or AppTest: a relative link still works
        base = ""
    return share_link(state(), base)


def manifest(result: RunResult, link: str = "") -> dict[str, Any]:
    """The run manifest: versions, models (sources, revisions, commits), dtype, device, token ids."""
    return {
        "app": "noLN Explorer", "noln_core_version": noln_core.__version__, "streamlit_version": st.__version__,
        "torch_version": torch.__version__, "python": platform.python_version(),
        "models": [{"name": r.info.name, "source": r.info.source, "revision": r.info.revision, "commit": r.info.commit,
                    "ln_free": r.info.ln_free, "dtype": r.info.dtype, "device": r.info.device} for r in result.runs],
        "text": result.text, "token_ids": [int(i) for i in result.token_ids], "prepend_bos": result.prepend_bos,
        "position": result.position,
        "answer": result.target.answer if result.target else None,
        "counterfactual": result.target.counterfactual if result.target else None,
        "link": link,
    }


def share_footer(result: RunResult | None) -> None:
    """Sidebar footer: the link that reproduces this view, and the run manifest."""
    with st.sidebar:
        st.subheader("Share")
        st.caption("Copy this link (button at its right) to reopen exactly this view.")
        link = share_url()
        st.code(link, language=None, wrap_lines=True)
        if result is not None:
            st.download_button("Run manifest (JSON)", json.dumps(manifest(result, link), indent=2),
                               file_name="noln-run-manifest.json", mime="application/json", key="manifest")
