// The negotiation playground: the frames of /ws/negotiations/ and the /api/v1/ negotiation
// endpoints, in plain JavaScript (no framework, no build step, nothing from other hosts).
// Out: start / watch / move / cancel. In: negotiation (a snapshot), turn, token, move, end, error;
// every frame names its negotiation_id, and this page shows one negotiation at a time.
// The API token lives in this tab's sessionStorage (shared with the chat playground) and only
// travels on the socket's ?token= and as a Bearer header: never in the page's own URL.
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const TOKEN_KEY = "negotiator.apiToken";
  const SIDES = ["buyer", "seller"];
  const REPLAY_DELAY = 600; // ms between two moves of a replay
  const PAGE_SIZE = 50; // scenarios per page of the library
  const PAST_SIZE = 10;
  const params = new URLSearchParams(location.search);
  const money = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD" });
  const price = (value) => (value === null || value === undefined ? "–" : money.format(value));
  const other = (side) => (side === "buyer" ? "seller" : "buyer");

  const state = {
    socket: null,
    id: null, // the negotiation on show
    mode: null, // "live" (started here), "watch" or "replay"
    starting: false, // a start frame is out, its snapshot not yet here
    info: null, // {scenario, buyer, seller, max_turns, opening, status}
    moves: [], // its moves so far, as the move frames (or the API) give them
    cards: new Map(), // "turn:side" -> the <li> of that move
    human: null, // the side a person plays on this page
    moving: false, // a person's move is out, its answer not yet here
    replay: null, // {data, next, timer}
    scenarios: new Map(), // library index -> scenario
    scenarioQuery: 0, // the latest library query (older answers are dropped)
    scenarioPage: 1,
    pastPage: 1,
  };

  // The API token -----------------------------------------------------------------------------

  const tokenInput = $("token");
  tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";
  tokenInput.addEventListener("change", () => {
    sessionStorage.setItem(TOKEN_KEY, tokenInput.value.trim());
    if (state.socket) state.socket.close(1000); // the next frame reconnects with the new token
    state.socket = null;
    hideError();
    loadModels();
    loadPast(1);
    if (state.id && state.mode !== "replay" && state.info && state.info.status === "running") {
      send({ type: "watch", negotiation_id: state.id }).catch(() => {});
    }
  });

  function authHeaders() {
    const token = tokenInput.value.trim();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  class ApiError extends Error {
    constructor(code, message) {
      super(message);
      this.code = code;
    }
  }

  // GET or POST under /api/v1/; an error body becomes an ApiError with its contract code.
  async function api(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
    } catch (error) {
      throw new ApiError("NETWORK_ERROR", `The server could not be reached (${error.message || error}).`);
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok) {
      const detail = (body && body.error) || {};
      throw new ApiError(detail.code || `HTTP_${response.status}`, detail.message || response.statusText);
    }
    return body;
  }

  function showError(code, message) {
    $("error-code").textContent = code;
    $("error-message").textContent = message;
    $("error").hidden = false;
  }

  function hideError() {
    $("error").hidden = true;
  }

  // The socket --------------------------------------------------------------------------------

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const token = tokenInput.value.trim();
    return `${scheme}://${location.host}/ws/negotiations/${token ? `?token=${encodeURIComponent(token)}` : ""}`;
  }

  function connect() {
    const current = state.socket;
    if (current && current.readyState === WebSocket.OPEN) return Promise.resolve(current);
    if (current && current.readyState === WebSocket.CONNECTING) {
      return new Promise((resolve, reject) => {
        current.addEventListener("open", () => resolve(current), { once: true });
        current.addEventListener("close", () => reject(new Error("socket closed")), { once: true });
      });
    }
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(socketUrl());
      state.socket = socket;
      socket.addEventListener("open", () => resolve(socket), { once: true });
      socket.addEventListener("message", (event) => onFrame(JSON.parse(event.data)));
      socket.addEventListener("close", (event) => {
        if (state.socket === socket) state.socket = null;
        state.starting = false;
        $("start").disabled = false;
        setMoving(false);
        if (event.code !== 1000 && event.code !== 1005) {
          const refused = !tokenInput.value && document.body.dataset.tokenRequired === "true";
          showError(
            "CONNECTION_CLOSED",
            refused
              ? "The connection was refused: this server needs an API token (the API token field above)."
              : `The connection closed (code ${event.code}); reload the page to follow the negotiation again.`,
          );
        }
        reject(new Error(`socket closed (${event.code})`));
      });
    });
  }

  async function send(frame) {
    (await connect()).send(JSON.stringify(frame));
  }

  function onFrame(frame) {
    const id = frame.negotiation_id;
    if (frame.type === "error") {
      onError(frame);
      return;
    }
    if (frame.type === "negotiation" && state.starting) {
      state.starting = false; // the snapshot of the negotiation just started
      $("start").disabled = false;
      state.id = id;
      state.mode = "live";
      history.replaceState(null, "", `?watch=${encodeURIComponent(id)}`); // a reload follows it
      loadPast(1);
    }
    if (id !== state.id || state.mode === "replay") return; // an earlier one, still followed
    switch (frame.type) {
      case "negotiation":
        onSnapshot(frame);
        break;
      case "turn":
        onTurn(frame);
        break;
      case "token":
        onToken(frame);
        break;
      case "move":
        onMove(frame);
        break;
      case "end":
        onEnd(frame);
        break;
    }
  }

  function onError(frame) {
    const id = frame.negotiation_id;
    if (id && id !== state.id && !state.starting) return; // about an earlier negotiation
    if (!id && state.starting) {
      state.starting = false; // the start was refused
      $("start").disabled = false;
    }
    setMoving(false);
    showError(frame.code, frame.message);
  }

  // A negotiation on show ---------------------------------------------------------------------

  function show(data, mode) {
    stopReplay();
    state.id = data.id || data.negotiation_id;
    state.mode = mode;
    state.info = {
      scenario: data.scenario,
      buyer: data.buyer,
      seller: data.seller,
      max_turns: data.max_turns,
      opening: data.opening,
      status: mode === "replay" ? "replaying" : data.status,
    };
    state.moves = [];
    state.cards.clear();
    state.human = mode === "replay" ? null : SIDES.find((side) => data[side].policy === "human") || null;
    $("moves").replaceChildren();
    $("outcome").hidden = true;
    $("out-error").hidden = true;
    $("arena").hidden = false;
    $("title").textContent = data.scenario.item.title;
    $("list-price").textContent = `list price ${price(data.scenario.list_price)}`;
    $("mode").textContent = { live: "live", watch: "watching", replay: "replay" }[mode];
    for (const side of SIDES) {
      const config = data[side];
      const parts = [config.policy === "human" && side === state.human ? "you" : config.policy];
      if (config.model) parts.push(config.model);
      if (config.persona) parts.push(`“${config.persona}”`);
      $(`${side}-info`).textContent = `(${parts.join(" · ")})`;
    }
    const link = $("watch-link");
    link.href = `/playground/negotiations/?watch=${encodeURIComponent(state.id)}`;
    link.hidden = mode === "replay";
    $("replay-skip").hidden = mode !== "replay";
    setStatus(state.info.status);
  }

  function setStatus(status) {
    state.info.status = status;
    $("status").textContent = status.replace("_", " ");
    $("status").dataset.status = status;
    $("stop").disabled = !(status === "running" && state.mode !== "replay");
    $("stop").hidden = state.mode === "replay";
    updateTurnLine();
    updatePlay();
  }

  function onSnapshot(frame) {
    show(frame, state.mode);
    for (const move of frame.moves) addMove(move);
    if (frame.live) {
      onTurn({ turn: frame.live.turn, side: frame.live.side }); // the move being written
      card(frame.live.turn, frame.live.side).querySelector(".text").textContent = frame.live.text;
    }
    if (frame.status !== "running") showOutcome(frame);
    drawChart();
    updateTurnLine();
    updatePlay();
    if (state.mode === "live") $("title").focus();
  }

  function onTurn(frame) {
    const item = card(frame.turn, frame.side);
    if (item.dataset.final === "true") return;
    item.querySelector(".text").textContent = ""; // asked again: what it wrote so far is dropped
    const note = item.querySelector(".note");
    if (frame.reason) {
      note.textContent = `Asked again (attempt ${frame.attempt || 2}): ${frame.reason}`;
      note.hidden = false;
    } else if (state.info[frame.side].policy === "human") {
      note.textContent = frame.side === state.human ? "Your move…" : `Waiting for the ${frame.side}'s move (a person)…`;
      note.hidden = false;
    }
    // A person's words come whole with the move; a model's stream in as it writes them.
    streaming(item, state.info[frame.side].policy !== "human");
    updateTurnLine();
  }

  function onToken(frame) {
    const item = card(frame.turn, frame.side);
    if (item.dataset.final === "true") return;
    item.querySelector(".text").textContent += frame.text;
    streaming(item, true);
  }

  function onMove(frame) {
    addMove(frame);
    drawChart();
    updateTurnLine();
    if (frame.side === state.human) {
      setMoving(false);
      hideError();
      $("move-price").value = "";
      $("move-message").value = "";
    }
    updatePlay();
  }

  function onEnd(frame) {
    for (const item of state.cards.values()) {
      if (item.dataset.final !== "true") {
        streaming(item, false);
        const note = item.querySelector(".note");
        note.textContent = "Cut off: the negotiation ended while this move was being written.";
        note.hidden = false;
      }
    }
    const hadFocus = document.activeElement;
    setStatus(frame.status);
    showOutcome(frame);
    if (frame.error) showError(frame.error.code, frame.error.message);
    setMoving(false);
    if (!hadFocus || hadFocus === document.body || $("play").contains(hadFocus) || hadFocus === $("stop")) {
      $("outcome").focus();
    }
    loadPast(1);
    revealScenario(state.id);
  }

  // Once it has ended the API shows both private numbers: the chart gets them too.
  async function revealScenario(id) {
    try {
      const data = await api(`/api/v1/negotiations/${encodeURIComponent(id)}`);
      if (state.id !== id || state.mode === "replay") return;
      state.info.scenario = data.scenario;
      state.human = null;
      drawChart();
    } catch {
      // the chart keeps what it had
    }
  }

  // Moves -------------------------------------------------------------------------------------

  function card(turn, side) {
    const key = `${turn}:${side}`;
    let item = state.cards.get(key);
    if (item) return item;
    item = document.createElement("li");
    item.className = "move";
    item.dataset.side = side;
    item.dataset.turn = String(turn);
    item.style.gridRow = String(turn); // one row per turn: the two columns read in order
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = `Turn ${turn} · ${side === state.human ? `${side} (you)` : side}`;
    const note = document.createElement("span");
    note.className = "note";
    note.hidden = true;
    const text = document.createElement("span");
    text.className = "text";
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.hidden = true;
    item.append(who, note, text, badge);
    $("moves").append(item);
    state.cards.set(key, item);
    return item;
  }

  function streaming(item, on) {
    item.classList.toggle("streaming", on);
    item.setAttribute("aria-busy", on ? "true" : "false");
  }

  function badgeText(move) {
    const label = {
      offer: `offer ${price(move.price)}`,
      accept: `accept ${price(move.price)}`,
      reject: "reject",
      walk_away: "walk away",
    }[move.action];
    return move.invalid ? `invalid: ${label}` : label;
  }

  function addMove(move) {
    if (state.moves.some((m) => m.turn === move.turn)) return; // already shown
    state.moves.push(move);
    state.moves.sort((a, b) => a.turn - b.turn);
    const item = card(move.turn, move.side);
    item.querySelector(".text").textContent = move.message; // the final text replaces the tokens
    const badge = item.querySelector(".badge");
    badge.textContent = badgeText(move);
    badge.dataset.action = move.action;
    badge.dataset.invalid = move.invalid ? "true" : "false";
    badge.hidden = false;
    const note = item.querySelector(".note");
    if (move.invalid) {
      note.textContent = `Refused twice, the turn passed: ${move.reason || "against the rules"}`;
      note.hidden = false;
    } else {
      note.hidden = true;
    }
    item.dataset.final = "true";
    item.dataset.action = move.action;
    streaming(item, false);
  }

  function nextSide() {
    const turn = state.moves.length + 1;
    return turn % 2 === 1 ? state.info.opening : other(state.info.opening);
  }

  function latestOffer(side) {
    for (let i = state.moves.length - 1; i >= 0; i--) {
      const move = state.moves[i];
      if (move.side === side && move.action === "offer" && !move.invalid) return move;
    }
    return null;
  }

  function updateTurnLine() {
    const line = $("turn-line");
    const info = state.info;
    if (!info) return;
    if (state.mode === "replay") {
      const total = state.replay ? state.replay.data.moves.length : state.moves.length;
      line.textContent = `Replay: ${state.moves.length} of ${total} moves.`;
      return;
    }
    if (info.status !== "running") {
      const deal = state.moves.find((m) => m.action === "accept" && !m.invalid);
      line.textContent = deal
        ? `Ended: a deal at ${price(deal.price)} on turn ${deal.turn}.`
        : `Ended: ${info.status.replace("_", " ")}.`;
      return;
    }
    const turn = state.moves.length + 1;
    const side = nextSide();
    let who;
    if (side === state.human) who = "your turn";
    else if (info[side].policy === "human") who = "a person is to move";
    else who = `the model is writing (${info[side].policy})`;
    line.textContent = `Turn ${turn} of ${info.max_turns}: the ${side}'s turn, ${who}.`;
  }

  // Playing a side ----------------------------------------------------------------------------

  function updatePlay() {
    const panel = $("play");
    const side = state.human;
    const wasYours = panel.dataset.yours === "true" && !panel.hidden;
    panel.hidden = !(side && state.info && state.info.status === "running" && state.mode !== "replay");
    if (panel.hidden) return;
    const info = state.info;
    panel.dataset.side = side;
    $("play-side").textContent = side;
    const own = side === "buyer" ? info.scenario.buyer_budget : info.scenario.seller_cost;
    $("play-number").textContent =
      own === null || own === undefined ? "" : `your ${side === "buyer" ? "budget" : "cost"} is ${price(own)}`;
    const turn = state.moves.length + 1;
    const next = nextSide();
    const yours = next === side;
    panel.dataset.yours = yours ? "true" : "false";
    $("your-turn").textContent = yours
      ? `Your turn (turn ${turn} of ${info.max_turns}): offer a price, accept or reject the ${other(side)}'s offer, or walk away.`
      : `The ${next}'s turn (turn ${turn} of ${info.max_turns}): wait for its move.`;
    const theirs = latestOffer(other(side));
    const accept = $("move-accept");
    accept.textContent = theirs ? `Accept ${price(theirs.price)}` : "Accept";
    accept.dataset.price = theirs ? String(theirs.price) : "";
    accept.disabled = state.moving || !theirs;
    $("move-reject").disabled = state.moving || !theirs;
    $("move-offer").disabled = state.moving;
    $("move-walk").disabled = state.moving;
    const focus = document.activeElement;
    if (yours && !wasYours && (!focus || focus === document.body || $("setup").contains(focus) || focus === $("title"))) {
      $("move-price").focus();
    }
  }

  function setMoving(on) {
    state.moving = on;
    if (!$("play").hidden) updatePlay();
  }

  async function sendMove(action) {
    if (!state.id || state.moving) return;
    const frame = { type: "move", negotiation_id: state.id, action, message: $("move-message").value.trim() };
    if (action === "offer") {
      const value = $("move-price").valueAsNumber;
      if (!Number.isFinite(value) || value <= 0) {
        showError("INVALID_MOVE", "An offer needs a price: how many dollars, e.g. 120.00.");
        $("move-price").focus();
        return;
      }
      frame.price = value;
    } else if (action === "accept") {
      frame.price = Number($("move-accept").dataset.price);
    }
    hideError();
    setMoving(true);
    try {
      await send(frame);
    } catch {
      setMoving(false);
    }
  }

  $("play").addEventListener("submit", (event) => {
    event.preventDefault(); // Offer is the form's submit button: Enter in the price field offers
    sendMove("offer");
  });
  $("move-message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("play").requestSubmit();
    }
  });
  $("move-accept").addEventListener("click", () => sendMove("accept"));
  $("move-reject").addEventListener("click", () => sendMove("reject"));
  $("move-walk").addEventListener("click", () => sendMove("walk_away"));

  // The outcome card --------------------------------------------------------------------------

  function showOutcome(data) {
    const metrics = data.metrics || {};
    const number = (value, digits) => (value === null || value === undefined ? "–" : Number(value).toFixed(digits));
    $("outcome").dataset.status = data.status;
    $("out-status").textContent = data.status.replace("_", " ");
    $("out-ended-by").textContent = (data.ended_by || "–").replace("_", " ");
    $("out-price").textContent = metrics.deal ? price(metrics.price) : "no deal";
    $("out-buyer-profit").textContent = number(metrics.buyer_profit, 2);
    $("out-seller-profit").textContent = number(metrics.seller_profit, 2);
    $("out-turns").textContent = number(metrics.turns, 0);
    $("out-invalid").textContent = number(metrics.invalid_moves, 0);
    $("out-tokens").textContent = number(metrics.tokens, 0);
    $("out-time").textContent =
      metrics.duration_ms === null || metrics.duration_ms === undefined ? "–" : `${(metrics.duration_ms / 1000).toFixed(1)} s`;
    const error = data.error;
    $("out-error").hidden = !error;
    if (error) {
      $("out-error-code").textContent = error.code;
      $("out-error-message").textContent = error.message;
    }
    $("outcome").hidden = false;
  }

  // The price chart (inline SVG) --------------------------------------------------------------

  function el(name, attributes = {}, text = "") {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
    if (text) node.textContent = text;
    return node;
  }

  function niceStep(range) {
    const rough = range / 5;
    const power = 10 ** Math.floor(Math.log10(rough));
    for (const factor of [1, 2, 2.5, 5, 10]) if (power * factor >= rough) return power * factor;
    return power * 10;
  }

  function drawChart() {
    const svg = $("chart-svg");
    const info = state.info;
    if (!info) return;
    const [width, height, left, right, top, bottom] = [480, 300, 60, 14, 14, 32];
    const scenario = info.scenario;
    // A person playing sees only their own number; a spectator what the scenario shows.
    const lines = [{ key: "list", value: scenario.list_price, label: "list" }];
    const showBudget = scenario.buyer_budget !== null && scenario.buyer_budget !== undefined && state.human !== "seller";
    const showCost = scenario.seller_cost !== null && scenario.seller_cost !== undefined && state.human !== "buyer";
    if (showBudget) lines.push({ key: "budget", value: scenario.buyer_budget, label: "budget" });
    if (showCost) lines.push({ key: "cost", value: scenario.seller_cost, label: "cost" });
    $("chart-private").textContent =
      showBudget && showCost ? ", the buyer's budget and the seller's cost (dotted)"
        : showBudget ? ", the buyer's budget (dotted)" : showCost ? ", the seller's cost (dotted)" : "";
    const offers = state.moves.filter((m) => m.action === "offer" && !m.invalid && m.price !== null);
    const deal = state.moves.find((m) => m.action === "accept" && !m.invalid && m.price !== null);
    const values = [...lines.map((l) => l.value), ...offers.map((o) => o.price)];
    let low = Math.min(...values);
    let high = Math.max(...values);
    const pad = (high - low) * 0.08 || high * 0.1 || 1;
    low = Math.max(0, low - pad);
    high += pad;
    const step = niceStep(high - low);
    low = Math.floor(low / step) * step;
    high = Math.ceil(high / step) * step;
    const turns = Math.max(2, info.max_turns);
    const x = (turn) => left + ((turn - 1) / (turns - 1)) * (width - left - right);
    const y = (value) => top + ((high - value) / (high - low)) * (height - top - bottom);

    const nodes = [];
    for (let value = low; value <= high + step / 2; value += step) {
      nodes.push(el("line", { class: "grid", x1: left, x2: width - right, y1: y(value), y2: y(value) }));
      nodes.push(el("text", { x: left - 6, y: y(value) + 4, "text-anchor": "end" }, money.format(value).replace(/\.00$/, "")));
    }
    const every = Math.ceil(turns / 12);
    for (let turn = 1; turn <= turns; turn++) {
      if ((turn - 1) % every && turn !== turns) continue;
      nodes.push(el("text", { x: x(turn), y: height - bottom + 16, "text-anchor": "middle" }, String(turn)));
    }
    nodes.push(el("text", { x: width - right, y: height - 4, "text-anchor": "end" }, "turn"));
    nodes.push(el("line", { class: "axis", x1: left, x2: left, y1: top, y2: height - bottom }));
    nodes.push(el("line", { class: "axis", x1: left, x2: width - right, y1: height - bottom, y2: height - bottom }));
    for (const line of lines) {
      nodes.push(el("line", { "data-line": line.key, x1: left, x2: width - right, y1: y(line.value), y2: y(line.value) }));
      const label = el("text", { x: width - right - 2, y: y(line.value) - 4, "text-anchor": "end" }, `${line.label} ${price(line.value)}`);
      if (line.key !== "list") label.setAttribute("class", `label-${line.key === "budget" ? "buyer" : "seller"}`);
      nodes.push(label);
    }
    for (const side of SIDES) {
      const mine = offers.filter((o) => o.side === side);
      if (mine.length > 1) {
        nodes.push(el("polyline", { "data-path": side, points: mine.map((o) => `${x(o.turn)},${y(o.price)}`).join(" ") }));
      }
      for (const offer of mine) {
        const point = el("circle", { "data-offer": side, "data-turn": offer.turn, "data-price": offer.price, cx: x(offer.turn), cy: y(offer.price), r: 5 });
        point.append(el("title", {}, `Turn ${offer.turn}: the ${side} offers ${price(offer.price)}`));
        nodes.push(point);
      }
    }
    if (deal) {
      const [cx, cy] = [x(deal.turn), y(deal.price)];
      const mark = el("polygon", { "data-deal": "true", points: `${cx},${cy - 9} ${cx + 9},${cy} ${cx},${cy + 9} ${cx - 9},${cy}` });
      mark.append(el("title", {}, `Deal at ${price(deal.price)} on turn ${deal.turn}`));
      nodes.push(mark);
      // Above the diamond, kept inside the plot near either edge.
      const anchor = cx > width - right - 40 ? "end" : cx < left + 40 ? "start" : "middle";
      const labelY = cy - 14 < top + 8 ? cy + 22 : cy - 14;
      nodes.push(el("text", { class: "label-deal", x: cx + { end: 9, start: -9, middle: 0 }[anchor], y: labelY, "text-anchor": anchor }, `deal ${price(deal.price)}`));
    }
    svg.replaceChildren(...nodes);
    const summary = SIDES.map((side) => `${offers.filter((o) => o.side === side).length} ${side} offers`).join(", ");
    svg.setAttribute("aria-description", `${summary}${deal ? `; a deal at ${price(deal.price)}` : ""}.`);
  }

  // Replay ------------------------------------------------------------------------------------

  async function replay(id) {
    hideError();
    let data;
    try {
      data = await api(`/api/v1/negotiations/${encodeURIComponent(id)}`);
    } catch (error) {
      showError(error.code, error.message);
      return;
    }
    history.replaceState(null, "", `?replay=${encodeURIComponent(id)}`);
    show(data, "replay");
    state.replay = { data, next: 0, timer: 0 };
    drawChart();
    updateTurnLine();
    $("title").focus();
    scheduleReplay();
  }

  function scheduleReplay() {
    const run = state.replay;
    if (!run) return;
    run.timer = setTimeout(() => {
      if (state.replay !== run) return;
      replayStep(run);
      if (run.next < run.data.moves.length) scheduleReplay();
      else finishReplay(run);
    }, REPLAY_DELAY);
  }

  function replayStep(run) {
    const move = run.data.moves[run.next++];
    addMove(move);
    drawChart();
    updateTurnLine();
  }

  function finishReplay(run) {
    clearTimeout(run.timer);
    while (run.next < run.data.moves.length) replayStep(run);
    $("replay-skip").hidden = true;
    state.info.status = run.data.status;
    $("status").textContent = run.data.status.replace("_", " ");
    $("status").dataset.status = run.data.status;
    if (run.data.status !== "running") showOutcome(run.data);
    updateTurnLine();
    $("turn-line").textContent += ` Ended: ${run.data.status.replace("_", " ")}.`;
  }

  function stopReplay() {
    if (state.replay) clearTimeout(state.replay.timer);
    state.replay = null;
  }

  $("replay-skip").addEventListener("click", () => {
    if (state.replay) finishReplay(state.replay);
    $("outcome").focus();
  });

  // Starting, watching, stopping --------------------------------------------------------------

  function sideConfig(side) {
    const config = { policy: $(`${side}-policy`).value };
    const model = $(`${side}-model`).value.trim();
    const persona = $(`${side}-persona`).value.trim();
    if (model) config.model = model;
    if (persona) config.persona = persona;
    return config;
  }

  async function start(event) {
    event.preventDefault();
    hideError();
    const frame = { type: "start", buyer: sideConfig("buyer"), seller: sideConfig("seller"), opening: $("opening").value };
    if (frame.buyer.policy === "human" && frame.seller.policy === "human") {
      showError("INVALID_REQUEST", "This page plays one side by hand at most: choose human for the buyer or for the seller.");
      return;
    }
    const turns = $("max-turns").value.trim();
    if (turns) frame.max_turns = Number(turns);
    if (document.querySelector("input[name=source]:checked").value === "library") {
      const index = $("scenario").value;
      if (index === "") {
        showError("INVALID_REQUEST", "Pick a product of the library (search it by title), or enter a custom scenario.");
        $("scenario-search").focus();
        return;
      }
      frame.scenario = Number(index);
    } else {
      frame.item = { title: $("custom-title").value.trim(), category: $("custom-category").value.trim() };
      frame.list_price = $("custom-list").valueAsNumber;
      frame.buyer_budget = $("custom-budget").valueAsNumber;
      frame.seller_cost = $("custom-cost").valueAsNumber;
      for (const key of ["list_price", "buyer_budget", "seller_cost"]) {
        if (!Number.isFinite(frame[key])) frame[key] = null; // the server names what is missing
      }
    }
    stopReplay();
    state.starting = true;
    $("start").disabled = true;
    try {
      await send(frame);
    } catch {
      state.starting = false;
      $("start").disabled = false;
    }
  }

  function watch(id) {
    state.id = id;
    state.mode = "watch";
    send({ type: "watch", negotiation_id: id }).catch(() => {});
  }

  $("setup").addEventListener("submit", start);
  $("stop").addEventListener("click", () => {
    if (state.id && state.mode !== "replay") {
      hideError();
      send({ type: "cancel", negotiation_id: state.id }).catch(() => {});
    }
  });

  // One side played by hand at most: "human" is offered to the other side only while it is not.
  for (const side of SIDES) {
    $(`${side}-policy`).addEventListener("change", () => {
      for (const s of SIDES) {
        const human = $(`${other(s)}-policy`).value === "human";
        $(`${s}-policy`).querySelector("option[value=human]").disabled = human;
      }
    });
  }

  // The scenario library ----------------------------------------------------------------------

  for (const radio of document.querySelectorAll("input[name=source]")) {
    radio.addEventListener("change", () => {
      const custom = document.querySelector("input[name=source]:checked").value === "custom";
      $("custom").hidden = !custom;
      $("library").hidden = custom;
    });
  }

  async function loadCategories() {
    try {
      const categories = await api("/api/v1/scenarios/categories");
      for (const category of categories) $("scenario-category").add(new Option(category, category));
    } catch (error) {
      $("scenario-count").textContent = `${error.code}: ${error.message}`;
    }
  }

  async function loadScenarios(append = false) {
    const query = ++state.scenarioQuery;
    state.scenarioPage = append ? state.scenarioPage + 1 : 1;
    const search = new URLSearchParams({ page: String(state.scenarioPage), page_size: String(PAGE_SIZE) });
    const text = $("scenario-search").value.trim();
    if (text) search.set("search", text);
    if ($("scenario-category").value) search.set("category", $("scenario-category").value);
    let body;
    try {
      body = await api(`/api/v1/scenarios?${search}`);
    } catch (error) {
      if (query === state.scenarioQuery) $("scenario-count").textContent = `${error.code}: ${error.message}`;
      return;
    }
    if (query !== state.scenarioQuery) return; // a newer search is under way
    const select = $("scenario");
    if (!append) {
      select.length = 0;
      state.scenarios.clear();
    }
    for (const item of body.items) {
      state.scenarios.set(String(item.index), item);
      const title = item.item.title.length > 90 ? `${item.item.title.slice(0, 89)}…` : item.item.title;
      const option = new Option(`${price(item.list_price)} · ${title}`, String(item.index));
      option.title = item.item.title;
      select.add(option);
    }
    if (!append && select.length) select.selectedIndex = 0;
    $("scenario-count").textContent = body.count ? `(${select.length} of ${body.count})` : "(none found)";
    $("scenario-more").hidden = select.length >= body.count;
    showScenario();
  }

  function showScenario() {
    const item = state.scenarios.get($("scenario").value);
    $("scenario-details").textContent = item
      ? `${item.item.category} · list price ${price(item.list_price)} · buyer's budget ${price(item.buyer_budget)} · seller's cost ${price(item.seller_cost)}${item.mutual_interest ? "" : " · no deal can profit both"}`
      : "";
  }

  let searchTimer = 0;
  $("scenario-search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => loadScenarios(), 250);
  });
  $("scenario-search").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault(); // searches, rather than starting a negotiation
      clearTimeout(searchTimer);
      loadScenarios();
    }
  });
  $("scenario-category").addEventListener("change", () => loadScenarios());
  $("scenario").addEventListener("change", showScenario);
  $("scenario-more").addEventListener("click", () => loadScenarios(true));

  // Models and the provider -------------------------------------------------------------------

  async function loadModels() {
    const status = $("provider-status");
    try {
      const body = await api("/api/v1/llm/status");
      $("models").replaceChildren(...(body.models || []).map((model) => new Option(model, model)));
      status.textContent = body.reachable
        ? `${body.provider}: reachable (${Math.round(body.latency_ms)} ms); default model ${(body.models || [])[0] || "–"}`
        : `${body.provider} at ${body.base_url}: ${body.error ? body.error.code : "unreachable"}`;
    } catch (error) {
      status.textContent = `status unavailable: ${error.code}`;
    }
  }

  // Past negotiations -------------------------------------------------------------------------

  async function loadPast(page) {
    state.pastPage = page;
    const status = $("past-status");
    let body;
    try {
      body = await api(`/api/v1/negotiations?page=${page}&page_size=${PAST_SIZE}`);
    } catch (error) {
      status.textContent = `${error.code}: ${error.message}`;
      return;
    }
    const rows = body.items.map((item) => {
      const row = document.createElement("tr");
      row.dataset.id = item.id;
      row.dataset.status = item.status;
      const cells = [
        new Date(item.created_at).toLocaleString(),
        item.scenario.item.title,
        `${item.buyer.policy} / ${item.seller.policy}`,
        item.status.replace("_", " "),
        item.metrics && item.metrics.deal ? price(item.metrics.price) : "–",
      ].map((text) => {
        const cell = document.createElement("td");
        cell.textContent = text;
        return cell;
      });
      cells[1].className = "item";
      cells[1].title = item.scenario.item.title;
      const actions = document.createElement("td");
      if (item.status === "running") {
        const link = document.createElement("a");
        link.href = `/playground/negotiations/?watch=${encodeURIComponent(item.id)}`;
        link.textContent = "Watch";
        actions.append(link);
      } else {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "replay";
        button.textContent = "Replay";
        button.setAttribute("aria-label", `Replay: ${item.scenario.item.title.slice(0, 60)}, ${item.status.replace("_", " ")}`);
        button.addEventListener("click", () => replay(item.id));
        actions.append(button);
      }
      row.append(...cells, actions);
      return row;
    });
    if (page === 1) $("past-rows").replaceChildren(...rows);
    else $("past-rows").append(...rows);
    const shown = $("past-rows").children.length;
    status.textContent = body.count ? `${shown} of ${body.count}, newest first` : "None yet.";
    $("past-more").hidden = shown >= body.count;
  }

  $("past-refresh").addEventListener("click", () => loadPast(1));
  $("past-more").addEventListener("click", () => loadPast(state.pastPage + 1));

  // Start-up ----------------------------------------------------------------------------------

  loadModels();
  loadCategories();
  loadScenarios();
  loadPast(1);
  if (params.get("watch")) watch(params.get("watch"));
  else if (params.get("replay")) replay(params.get("replay"));
})();
