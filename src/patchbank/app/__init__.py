"""Streamlit app over fitted score runs: pages in :mod:`patchbank.app.page`, logic in
:mod:`patchbank.app.logic`, start with ``patchbank-app`` (:mod:`patchbank.app.launch`)."""
