"""The app shell, split by job; a page script imports only what it shows.

* :mod:`.limits`, :mod:`.links`: pure Python: what a deployment allows, and the shareable state (``AppState``),
  presets and query-parameter parsing;
* :mod:`.state`: the session's ``AppState`` in ``st.session_state`` and the URL, and widgets bound to it;
* :mod:`.cache`: the process-wide model store, run cache and analysis cache (every ``st.cache_*`` lives here);
* :mod:`.sidebar`: the shared sidebar widgets;
* :mod:`.runs`: loading the models and running them once per input (``prepare``), and the current run for a page;
* :mod:`.display`: user text made inert, figures with their downloads;
* :mod:`.export`: the shareable link and the run manifest.
"""
