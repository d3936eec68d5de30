// The Negotiator playground: the WebSocket protocol of /ws/llm/stream/, in plain JavaScript.
// Frames are exactly those of the README: generate / cancel / watch out; start, token, done,
// error and watching in. The API token lives in this tab's sessionStorage and only ever travels
// on the socket's ?token= (and as a Bearer header): never in the page's own URL.
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const isStaff = document.body.dataset.staff === "true";
  const TOKEN_KEY = "negotiator.apiToken";

  const state = {
    socket: null,
    sessionId: null,
    generating: false,
    sentAt: 0,
    firstTokenAt: 0,
    reply: null, // the <li> of the reply being streamed
    watchId: new URLSearchParams(location.search).get("watch"),
  };

  const tokenInput = $("token");
  tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";
  tokenInput.addEventListener("change", () => {
    sessionStorage.setItem(TOKEN_KEY, tokenInput.value.trim());
    if (state.socket) state.socket.close(); // the next frame reconnects with the new token
    state.socket = null;
    loadModels();
  });

  function authHeaders() {
    const token = tokenInput.value.trim();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  async function loadModels() {
    const status = $("provider-status");
    try {
      const response = await fetch("/api/v1/llm/status", { headers: authHeaders() });
      const body = await response.json();
      const select = $("model");
      select.length = 1;
      for (const model of body.models || []) select.add(new Option(model, model));
      if (body.models && body.models.length) select.value = body.models[0];
      status.textContent = body.reachable
        ? `${body.provider} at ${body.base_url}: reachable (${Math.round(body.latency_ms)} ms)`
        : `${body.provider} at ${body.base_url}: ${body.error ? body.error.code : "unreachable"}`;
    } catch (error) {
      status.textContent = `status unavailable: ${error}`;
    }
  }

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const token = tokenInput.value.trim();
    return `${scheme}://${location.host}/ws/llm/stream/${token ? `?token=${encodeURIComponent(token)}` : ""}`;
  }

  function connect() {
    if (state.socket && state.socket.readyState <= WebSocket.OPEN) {
      return state.socket.readyState === WebSocket.OPEN
        ? Promise.resolve(state.socket)
        : new Promise((resolve) => state.socket.addEventListener("open", () => resolve(state.socket), { once: true }));
    }
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(socketUrl());
      state.socket = socket;
      socket.addEventListener("open", () => resolve(socket), { once: true });
      socket.addEventListener("message", (event) => onFrame(JSON.parse(event.data)));
      socket.addEventListener("close", (event) => {
        if (state.socket === socket) state.socket = null;
        if (state.generating) finish();
        if (event.code !== 1000 && event.code !== 1005) {
          showError("CONNECTION_CLOSED", tokenInput.value || document.body.dataset.tokenRequired !== "true"
            ? `The connection closed (code ${event.code}).`
            : "The connection was refused: this server needs an API token.");
        }
        reject(new Error(`socket closed (${event.code})`));
      });
    });
  }

  function addMessage(role, text) {
    const item = document.createElement("li");
    item.className = role;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    item.append(body);
    $("messages").append(item);
    item.scrollIntoView({ block: "end" });
    return item;
  }

  function showError(code, message) {
    $("error-code").textContent = code;
    $("error-message").textContent = message;
    $("error").hidden = false;
  }

  function setGenerating(on) {
    state.generating = on;
    $("send").disabled = on;
    $("stop").disabled = !on;
  }

  function finish() {
    setGenerating(false);
    if (state.reply) state.reply.classList.remove("streaming");
  }

  function showSession(sessionId) {
    state.sessionId = sessionId;
    $("session").textContent = sessionId;
    $("watch-link").href = `/playground/?watch=${encodeURIComponent(sessionId)}`;
    $("admin-link").href = `/admin/llm/session/${encodeURIComponent(sessionId)}/change/`;
    $("admin-link").hidden = !isStaff;
    $("session-line").hidden = false;
  }

  function showFigures(frame) {
    const usage = frame.usage || {};
    const now = performance.now();
    $("finish-reason").textContent = frame.finish_reason;
    $("usage").textContent =
      `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ${usage.total_tokens} tokens` +
      (usage.estimated ? " (estimated)" : "");
    $("ttft").textContent = state.firstTokenAt ? `${Math.round(state.firstTokenAt - state.sentAt)} ms` : "–";
    const seconds = state.firstTokenAt ? (now - state.firstTokenAt) / 1000 : 0;
    $("tps").textContent = seconds > 0 ? (usage.completion_tokens / seconds).toFixed(1) : "–";
    $("meta").hidden = false;
  }

  function onFrame(frame) {
    switch (frame.type) {
      case "start":
        showSession(frame.session_id);
        state.reply.dataset.model = frame.model;
        state.reply.title = `${frame.provider} · ${frame.model}`;
        break;
      case "watching":
        $("watch-status").textContent = frame.status;
        state.reply = state.reply || addMessage("assistant", "");
        state.reply.querySelector(".text").textContent = frame.text;
        if (frame.status === "streaming") state.reply.classList.add("streaming");
        showSession(frame.session_id);
        break;
      case "token":
        if (!state.firstTokenAt) state.firstTokenAt = performance.now();
        state.reply.querySelector(".text").textContent += frame.text;
        break;
      case "done":
        showFigures(frame);
        $("watch-status").textContent = frame.finish_reason === "cancelled" ? "cancelled" : "completed";
        finish();
        break;
      case "error":
        showError(frame.code, frame.message);
        finish();
        break;
    }
  }

  async function send(event) {
    event.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || state.generating) return;
    $("error").hidden = true;
    $("meta").hidden = true;
    const messages = [];
    const system = $("system").value.trim();
    if (!state.sessionId && system) messages.push({ role: "system", content: system });
    messages.push({ role: "user", content: prompt });
    const frame = { type: "generate", messages };
    if ($("model").value) frame.model = $("model").value;
    if (state.sessionId) frame.session_id = state.sessionId;

    addMessage("user", prompt);
    state.reply = addMessage("assistant", "");
    state.reply.classList.add("streaming");
    $("prompt").value = "";
    setGenerating(true);
    state.sentAt = performance.now();
    state.firstTokenAt = 0;
    try {
      (await connect()).send(JSON.stringify(frame));
    } catch (error) {
      finish();
    }
  }

  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("composer").requestSubmit();
  });
  $("stop").addEventListener("click", () => {
    if (state.socket && state.generating) state.socket.send(JSON.stringify({ type: "cancel" }));
  });
  $("new").addEventListener("click", () => {
    state.sessionId = null;
    state.reply = null;
    $("messages").replaceChildren();
    $("session-line").hidden = true;
    $("meta").hidden = true;
    $("error").hidden = true;
  });

  loadModels();
  if (state.watchId) {
    $("watch-banner").hidden = false;
    $("watch-id").textContent = state.watchId;
    $("composer").hidden = true;
    state.generating = true;
    state.sentAt = performance.now();
    connect().then((socket) => socket.send(JSON.stringify({ type: "watch", session_id: state.watchId })));
  }
})();
