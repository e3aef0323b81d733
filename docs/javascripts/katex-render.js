// Render the maths that pymdownx.arithmatex (generic mode) wraps in \( \) and \[ \], with the
// KaTeX vendored beside this file (no network). Material's document$ re-runs it on page changes.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
