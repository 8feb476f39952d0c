"""summarize.py's parts: reading and grouping run folders (collect), the spread over seeds
(stats), the tables (tables: Markdown, CSV, LaTeX), the plots (plots)."""
