// Sorting, filtering and chart-to-row links. Reads only the page itself; fetches nothing.
(() => {
  "use strict";

  const value = (row, i) => row.cells[i].dataset.value ?? row.cells[i].textContent.trim();

  /** Order the rows of `table` by column `i`; numeric columns keep missing values last. */
  const sortBy = (table, th, i) => {
    const ascending = th.getAttribute("aria-sort") !== "ascending";
    for (const other of th.parentElement.cells) other.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const sign = ascending ? 1 : -1;
    const numeric = th.dataset.sort === "num";
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    rows.sort((a, b) => {
      const x = value(a, i), y = value(b, i);
      if (!numeric) return sign * x.localeCompare(y, undefined, { numeric: true });
      if (x === "" || y === "") return (x === "") - (y === "");
      return sign * (Number(x) - Number(y));
    });
    body.append(...rows);
  };

  for (const table of document.querySelectorAll("table.sortable")) {
    Array.from(table.tHead.rows[0].cells).forEach((th, i) => {
      th.tabIndex = 0;
      th.addEventListener("click", () => sortBy(table, th, i));
      th.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          sortBy(table, th, i);
        }
      });
    });
  }

  /** Show only the rows whose text contains the query; report how many are shown. */
  const filter = (input) => {
    const table = document.getElementById(input.dataset.filter);
    const query = input.value.trim().toLowerCase();
    let shown = 0;
    for (const row of table.tBodies[0].rows) {
      const match = row.textContent.toLowerCase().includes(query);
      row.hidden = !match;
      shown += match;
    }
    const count = document.querySelector(`[data-count-for="${input.dataset.filter}"]`);
    if (count) count.textContent = `${shown} of ${table.tBodies[0].rows.length} trials`;
  };

  for (const input of document.querySelectorAll("input[data-filter]")) {
    input.addEventListener("input", () => filter(input));
    filter(input);
  }

  for (const mark of document.querySelectorAll(".mark[data-row], .dist[data-row]")) {
    mark.addEventListener("click", () => {
      const row = document.getElementById(mark.dataset.row);
      if (!row) return;
      row.scrollIntoView({ behavior: "smooth", block: "center" });
      row.classList.add("flash");
      setTimeout(() => row.classList.remove("flash"), 1200);
    });
  }
})();
