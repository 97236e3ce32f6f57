"""Tour: a guided walk through what removing LayerNorm changes, step by step, with numbers from the live run."""

import streamlit as st

from noln_core import NolnError
from noln_core.teaching.tour import TourError, step_facts, step_text
from pages import PAGES
from pages.shell.display import md
from pages.shell.runs import analysis, current_run
from pages.shell.tour import (
    apply_step, chosen_tour, current_step, go, inert_facts, restore_button, step_figure, step_findings,
)

tour = chosen_tour()
if tour is not None:
    index, step = current_step(tour)
    restore_button()
    apply_step(tour, index, step)
    st.header(tour.title)
    if index == 1 and tour.introduction:
        st.markdown(tour.introduction)
    st.progress(index / len(tour.steps), text=f"Step {index} of {len(tour.steps)}")
    st.subheader(step.title)
    result = current_run()
    try:
        text = step_text(step, inert_facts(step_facts(step, result, analysis, step_findings(result))),
                         f"tour {tour.name!r}, step {index}") if result is not None else None
    except (TourError, NolnError) as err:  # a bad tour file; a step the models cannot run (one line)
        st.error(md(str(err)), icon=":material/error:")
        text = None
    if result is not None and text is not None:
        notice, weak, question = text
        step_figure(step, result)
        st.markdown("**What to notice.** " + notice.strip())
        for sentence in weak:
            st.info(sentence, icon=":material/info:")
        st.markdown("**Your turn.** " + question.strip())
        if step.link_page:
            spec = next((p for p in PAGES if p.name == step.link_page), None)
            if spec is not None:
                st.page_link(spec.script, label=f"Go further: the {spec.title} page", icon=spec.icon)
    back, _, forward = st.columns([1, 4, 1])
    back.button("← Back", key="tour_back", on_click=go, args=(-1,), disabled=index == 1, width="stretch")
    forward.button("Next →", key="tour_next", on_click=go, args=(1,), disabled=index == len(tour.steps),
                   width="stretch")
    st.caption(md(f"Tour file: {tour.name}. Share this step with the link in the sidebar."))
