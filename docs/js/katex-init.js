// Renders the formulas of the pages with the KaTeX shipped in js/katex/.
// pymdownx.arithmatex (generic mode) writes $...$ as \(...\) and $$...$$ as \[...\]
// inside elements of class "arithmatex"; only those elements are rendered, so a dollar
// sign or a backslash in code or prose is left alone.
(function () {
  "use strict";
  var delimiters = [
    { left: "\\(", right: "\\)", display: false },
    { left: "\\[", right: "\\]", display: true },
  ];
  function render() {
    var nodes = document.querySelectorAll(".arithmatex");
    for (var i = 0; i < nodes.length; i++) {
      renderMathInElement(nodes[i], { delimiters: delimiters, throwOnError: false });
    }
  }
  if (typeof document$ !== "undefined") {
    // Material's instant navigation swaps pages without a load event.
    document$.subscribe(render);
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", render);
  } else {
    render();
  }
})();
