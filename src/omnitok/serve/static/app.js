// omnitok chat page: talks to the OpenAI-compatible API of `omnitok serve` (vanilla JS, no build step).
"use strict";

(() => {
  const SAMPLE_RATE = 16000; // the API's PCM16 audio: 16 kHz mono
  const MAX_RECORD_S = 60;
  const MAX_IMAGE_SIDE = 1024;
  const STORE = {
    key: "omnitok.apiKey", maxTokens: "omnitok.maxTokens", temperature: "omnitok.temperature", seed: "omnitok.seed",
  };
  // the API lives next to the page: "/" -> "/v1/...", "/prefix/" -> "/prefix/v1/..."
  const BASE = location.pathname.replace(/static\/(index\.html)?$/, "").replace(/[^/]*$/, "");

  const $ = (id) => document.getElementById(id);
  const els = {
    log: $("log"), empty: $("empty"), modelName: $("model-name"), infoLine: $("info-line"),
    settings: $("settings"), settingsBtn: $("settings-btn"), settingsForm: $("settings-form"),
    apiKey: $("api-key"), forgetKey: $("forget-key"), maxTokens: $("max-tokens"), temperature: $("temperature"),
    seed: $("seed"),
    clearBtn: $("clear-btn"), composer: $("composer"), message: $("message"), sendBtn: $("send-btn"),
    stopBtn: $("stop-btn"), attachments: $("attachments"), imageInput: $("image-input"),
    audioInput: $("audio-input"), recordBtn: $("record-btn"), recordLabel: $("record-label"),
    replyKind: $("reply-kind"), voice: $("voice"), voiceField: $("voice-field"), pitch: $("pitch"),
    pitchField: $("pitch-field"), rate: $("rate"), rateField: $("rate-field"), status: $("status"),
  };

  const state = {
    model: null,       // model id sent with each request
    history: [],       // OpenAI-shaped messages sent with each request
    attachments: [],   // {kind: "image", url, name} | {kind: "audio", wav: Uint8Array, name, url}
    turn: null,        // the reply being streamed
    recorder: null,
    playCtx: null,     // AudioContext for streamed speech (created on a click, so it may play)
    loading: null,     // the /v1/omnitok/info request in flight
  };

  // ---------------------------------------------------------------- small helpers

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c) node.append(c);
    return node;
  }

  function setStatus(text, bad = false) {
    els.status.textContent = text || "";
    els.status.classList.toggle("bad", Boolean(bad));
  }

  function apiKey() { return localStorage.getItem(STORE.key) || ""; }

  function headers(json = false) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = apiKey();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  // The API's error body is {"error": {"message", "type", "code"}}; anything else is shown as it came.
  async function errorText(resp) {
    let body = "";
    try { body = await resp.text(); } catch { /* body unreadable */ }
    let message = "";
    try {
      const data = JSON.parse(body);
      const err = data && data.error !== undefined ? data.error : data;
      if (typeof err === "string") message = err;
      else if (err && err.message) message = String(err.message);
      else if (data && data.detail) message = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
    } catch { message = body.trim().slice(0, 500); }
    const what = `HTTP ${resp.status}${resp.statusText ? " " + resp.statusText : ""}`;
    return message ? `${message} (${what})` : what;
  }

  function nearBottom() {
    const log = els.log;
    return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  }
  function scrollDown(force = false) {
    if (force || nearBottom()) els.log.scrollTop = els.log.scrollHeight;
  }

  function bytesToBase64(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
  }
  function base64ToBytes(b64) {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }

  // ---------------------------------------------------------------- audio: PCM16, WAV, resampling

  function floatToPcm16(samples) {
    const out = new Int16Array(samples.length);
    for (let i = 0; i < samples.length; i++) {
      const x = Math.max(-1, Math.min(1, samples[i]));
      out[i] = x < 0 ? x * 0x8000 : x * 0x7fff;
    }
    return out;
  }

  function pcm16Bytes(int16) {
    const bytes = new Uint8Array(int16.length * 2);
    const view = new DataView(bytes.buffer);
    for (let i = 0; i < int16.length; i++) view.setInt16(i * 2, int16[i], true);
    return bytes;
  }

  function wavFromPcm16Bytes(pcm, rate = SAMPLE_RATE) {
    const out = new Uint8Array(44 + pcm.length);
    const v = new DataView(out.buffer);
    const tag = (o, s) => { for (let i = 0; i < 4; i++) out[o + i] = s.charCodeAt(i); };
    tag(0, "RIFF"); v.setUint32(4, 36 + pcm.length, true); tag(8, "WAVE");
    tag(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
    v.setUint32(24, rate, true); v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
    tag(36, "data"); v.setUint32(40, pcm.length, true);
    out.set(pcm, 44);
    return out;
  }

  // Any AudioBuffer -> 16 kHz mono Float32Array (OfflineAudioContext mixes down and resamples).
  async function toMono16k(buffer) {
    const frames = Math.max(1, Math.ceil(buffer.duration * SAMPLE_RATE));
    const off = new OfflineAudioContext(1, frames, SAMPLE_RATE);
    const src = off.createBufferSource();
    src.buffer = buffer;
    src.connect(off.destination);
    src.start();
    const rendered = await off.startRendering();
    return rendered.getChannelData(0);
  }

  // Streamed speech: each PCM16 chunk becomes an AudioBuffer scheduled right after the previous one.
  class PcmPlayer {
    constructor(ctx) {
      this.ctx = ctx;
      this.at = 0;
      this.sources = new Set();
      this.carry = null; // an odd trailing byte from the previous chunk
      this.played = 0;
    }
    push(bytes) {
      if (this.carry !== null) {
        const joined = new Uint8Array(bytes.length + 1);
        joined[0] = this.carry; joined.set(bytes, 1); bytes = joined; this.carry = null;
      }
      if (bytes.length % 2) { this.carry = bytes[bytes.length - 1]; bytes = bytes.subarray(0, bytes.length - 1); }
      const n = bytes.length / 2;
      if (!n || !this.ctx) return;
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
      const samples = new Float32Array(n);
      for (let i = 0; i < n; i++) samples[i] = view.getInt16(i * 2, true) / 32768;
      const buf = this.ctx.createBuffer(1, n, SAMPLE_RATE);
      buf.copyToChannel(samples, 0);
      const src = this.ctx.createBufferSource();
      src.buffer = buf;
      src.connect(this.ctx.destination);
      const start = Math.max(this.at, this.ctx.currentTime + 0.06);
      src.start(start);
      this.at = start + buf.duration;
      this.sources.add(src);
      src.onended = () => this.sources.delete(src);
      this.played += 1;
    }
    get busy() { return this.sources.size > 0; }
    stop() {
      for (const s of this.sources) { try { s.stop(); } catch { /* already stopped */ } }
      this.sources.clear();
    }
  }

  function playContext() {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) return null;
    if (!state.playCtx) state.playCtx = new Ctx();
    if (state.playCtx.state === "suspended") state.playCtx.resume().catch(() => {});
    return state.playCtx;
  }

  // ---------------------------------------------------------------- server info

  function names(list) {
    if (!list) return [];
    if (!Array.isArray(list)) list = typeof list === "object" ? Object.keys(list) : [list];
    return list.map((v) => (v && typeof v === "object" ? v.id || v.name : v)).filter(Boolean).map(String);
  }

  // `fallback`: the value sent when the bundle lists none ("" sends nothing)
  function fillSelect(select, values, field, fallback = "") {
    const keep = select.value;
    select.replaceChildren();
    if (!values.length || fallback === "") select.append(el("option", { value: fallback, text: "default" }));
    for (const v of values) select.append(el("option", { value: v, text: v }));
    if (values.includes(keep)) select.value = keep;
    if (field && field !== els.voiceField) field.hidden = values.length === 0;
  }

  function applyInfo(info) {
    if (info.model || info.id) state.model = info.model || info.id;
    const mods = info.modalities || {};
    const reads = names(info.input_modalities || mods.input || mods.read || info.reads);
    const writes = names(info.output_modalities || mods.output || mods.write || info.writes);
    if (writes.length) {
      const can = { text: writes.includes("text"), voice: writes.includes("audio") || writes.includes("speech"),
        image: writes.includes("image") };
      for (const opt of els.replyKind.options) {
        opt.disabled = !can[opt.value];
        opt.textContent = opt.textContent.replace(/ \(not in this model\)$/, "") + (can[opt.value] ? "" : " (not in this model)");
      }
      if (els.replyKind.selectedOptions[0] && els.replyKind.selectedOptions[0].disabled) els.replyKind.value = "text";
    }
    if (reads.length) {
      const canImage = reads.includes("image");
      const canAudio = reads.includes("audio") || reads.includes("speech");
      els.imageInput.disabled = !canImage;
      els.imageInput.closest("label").classList.toggle("off", !canImage);
      els.imageInput.closest("label").hidden = !canImage;
      els.audioInput.closest("label").hidden = !canAudio;
      els.recordBtn.hidden = !canAudio;
    }
    const audio = info.audio || {};
    // the API needs a voice; "alloy" (an OpenAI name) is mapped by the server onto one of the bundle's voices
    fillSelect(els.voice, names(info.voices || audio.voices), els.voiceField, "alloy");
    fillSelect(els.pitch, names(info.pitches || audio.pitches), els.pitchField);
    fillSelect(els.rate, names(info.rates || audio.rates), els.rateField);
    const parts = [];
    if (reads.length) parts.push(`reads ${reads.join(", ")}`);
    if (writes.length) parts.push(`writes ${writes.join(", ")}`);
    const size = info.image_size;
    if (size) parts.push(`images ${Array.isArray(size) ? size.join("×") : `${size}×${size}`}`);
    els.infoLine.textContent = parts.join(" · ");
    updateKindControls();
  }

  function loadInfo() {
    state.loading = fetchInfo().finally(() => { state.loading = null; });
    return state.loading;
  }

  async function fetchInfo() {
    setStatus("");
    try {
      const resp = await fetch(`${BASE}v1/omnitok/info`, { headers: headers() });
      if (resp.ok) {
        applyInfo(await resp.json());
      } else if (resp.status === 401 || resp.status === 403) {
        needKey(await errorText(resp));
        return;
      }
      if (!state.model) {
        const models = await fetch(`${BASE}v1/models`, { headers: headers() });
        if (models.status === 401 || models.status === 403) { needKey(await errorText(models)); return; }
        if (!models.ok) throw new Error(await errorText(models));
        const data = await models.json();
        const first = data && Array.isArray(data.data) && data.data[0];
        if (first) state.model = first.id;
        if (first && !els.infoLine.textContent) applyInfo({ ...first, ...(first.omnitok || {}) });
      }
      els.modelName.textContent = state.model || "no model";
    } catch (err) {
      els.modelName.textContent = "offline";
      setStatus(`Could not reach the server: ${err.message || err}`, true);
    }
  }

  function needKey(message) {
    els.modelName.textContent = "API key needed";
    setStatus(`The server wants an API key: ${message}. Enter it under Settings.`, true);
    openSettings(true);
  }

  function openSettings(open) {
    els.settings.hidden = !open;
    els.settingsBtn.setAttribute("aria-expanded", String(open));
    if (open) els.apiKey.focus();
  }

  // ---------------------------------------------------------------- attachments

  function renderAttachments() {
    els.attachments.replaceChildren();
    state.attachments.forEach((a, i) => {
      const remove = el("button", {
        type: "button", "aria-label": `Remove ${a.kind === "image" ? "image" : "audio"} ${a.name}`, title: "Remove",
        text: "×", onclick: () => { state.attachments.splice(i, 1); renderAttachments(); els.message.focus(); },
      });
      const preview = a.kind === "image"
        ? el("img", { src: a.url, alt: `Attached image ${a.name}` })
        : el("audio", { src: a.url, controls: true, preload: "metadata", "aria-label": `Attached audio ${a.name}` });
      els.attachments.append(el("div", { class: `chip ${a.kind}` }, preview, el("span", { class: "name", text: a.name }), remove));
    });
    els.attachments.hidden = state.attachments.length === 0;
  }

  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(r.result);
      r.onerror = () => reject(r.error || new Error("could not read the file"));
      r.readAsDataURL(file);
    });
  }

  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("not a readable image"));
      img.src = url;
    });
  }

  // PNG/JPEG are sent as they are; other formats, and very large pictures, are redrawn (PNG, or JPEG for JPEGs).
  async function imageDataURL(file) {
    let url = await readAsDataURL(file);
    const img = await loadImage(url);
    const plain = /^data:image\/(png|jpeg);/.test(url);
    const big = Math.max(img.naturalWidth, img.naturalHeight) > MAX_IMAGE_SIDE;
    if (!plain || big) {
      const scale = Math.min(1, MAX_IMAGE_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
      canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
      canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
      url = url.startsWith("data:image/jpeg;") ? canvas.toDataURL("image/jpeg", 0.92) : canvas.toDataURL("image/png");
    }
    return url;
  }

  async function onImageChosen() {
    const file = els.imageInput.files && els.imageInput.files[0];
    els.imageInput.value = "";
    if (!file) return;
    try {
      const url = await imageDataURL(file);
      state.attachments.push({ kind: "image", url, name: file.name || "image" });
      renderAttachments();
      setStatus("");
    } catch (err) {
      setStatus(`Could not attach ${file.name}: ${err.message || err}`, true);
    }
  }

  function addAudioAttachment(samples16k, name) {
    const wav = wavFromPcm16Bytes(pcm16Bytes(floatToPcm16(samples16k)));
    const url = URL.createObjectURL(new Blob([wav], { type: "audio/wav" }));
    state.attachments.push({ kind: "audio", wav, url, name });
    renderAttachments();
  }

  async function decodeAudio(arrayBuffer) {
    const Ctx = window.OfflineAudioContext;
    const ctx = new Ctx(1, 1, 44100);
    return await ctx.decodeAudioData(arrayBuffer);
  }

  async function onAudioChosen() {
    const file = els.audioInput.files && els.audioInput.files[0];
    els.audioInput.value = "";
    if (!file) return;
    try {
      const buffer = await decodeAudio(await file.arrayBuffer());
      addAudioAttachment(await toMono16k(buffer), `${file.name} (${buffer.duration.toFixed(1)} s)`);
      setStatus("");
    } catch (err) {
      setStatus(`Could not read ${file.name} as audio: ${err.message || err}`, true);
    }
  }

  // ---------------------------------------------------------------- microphone

  async function startRecording() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      setStatus("The microphone needs a secure page (https or localhost) and a browser that allows it.", true);
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
    } catch (err) {
      setStatus(`Microphone unavailable: ${err.message || err.name || err}`, true);
      return;
    }
    const Ctx = window.AudioContext || window.webkitAudioContext;
    const ctx = new Ctx();
    const source = ctx.createMediaStreamSource(stream);
    const proc = ctx.createScriptProcessor(4096, 1, 1);
    const mute = ctx.createGain();
    mute.gain.value = 0;
    const chunks = [];
    proc.onaudioprocess = (e) => chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
    source.connect(proc);
    proc.connect(mute);
    mute.connect(ctx.destination);
    const started = performance.now();
    const rec = { stream, ctx, source, proc, mute, chunks, started };
    rec.timer = setInterval(() => {
      const s = (performance.now() - started) / 1000;
      els.recordLabel.textContent = `Stop ${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, "0")}`;
      if (s >= MAX_RECORD_S) stopRecording();
    }, 250);
    state.recorder = rec;
    els.recordBtn.setAttribute("aria-pressed", "true");
    els.recordBtn.setAttribute("aria-label", "Stop recording");
    els.recordLabel.textContent = "Stop 0:00";
    setStatus("Recording… press Stop when done.");
  }

  async function stopRecording() {
    const rec = state.recorder;
    if (!rec) return;
    state.recorder = null;
    clearInterval(rec.timer);
    rec.proc.onaudioprocess = null;
    rec.source.disconnect(); rec.proc.disconnect(); rec.mute.disconnect();
    for (const t of rec.stream.getTracks()) t.stop();
    els.recordBtn.setAttribute("aria-pressed", "false");
    els.recordBtn.setAttribute("aria-label", "Record from the microphone");
    els.recordLabel.textContent = "Record";
    const total = rec.chunks.reduce((n, c) => n + c.length, 0);
    const rate = rec.ctx.sampleRate;
    try {
      if (!total) throw new Error("no sound was captured");
      const buffer = rec.ctx.createBuffer(1, total, rate);
      const data = buffer.getChannelData(0);
      let at = 0;
      for (const c of rec.chunks) { data.set(c, at); at += c.length; }
      addAudioAttachment(await toMono16k(buffer), `recording (${(total / rate).toFixed(1)} s)`);
      setStatus("");
    } catch (err) {
      setStatus(`Recording failed: ${err.message || err}`, true);
    } finally {
      rec.ctx.close().catch(() => {});
    }
  }

  // ---------------------------------------------------------------- conversation rendering

  function addBubble(role) {
    els.empty.hidden = true;
    const label = role === "user" ? "You" : "omnitok";
    const bubble = el("div", { class: "bubble" }, el("div", { class: "text" }));
    const node = el("article", { class: `msg ${role}`, "data-role": role, "aria-label": `${label} said` },
      el("div", { class: "who", text: label, "aria-hidden": "true" }), bubble);
    els.log.append(node);
    scrollDown(true);
    return { node, bubble, textEl: bubble.querySelector(".text") };
  }

  function shownImage(url, alt) {
    return el("img", { class: "shot", src: url, alt });
  }

  function renderUser(content) {
    const b = addBubble("user");
    const parts = typeof content === "string" ? [{ type: "text", text: content }] : content;
    for (const p of parts) {
      if (p.type === "text") b.textEl.textContent += p.text;
      else if (p.type === "image_url") b.bubble.append(shownImage(p.image_url.url, "Your picture"));
      else if (p.type === "input_audio") {
        const wav = base64ToBytes(p.input_audio.data);
        const url = URL.createObjectURL(new Blob([wav], { type: "audio/wav" }));
        b.bubble.append(el("audio", { src: url, controls: true, preload: "metadata", "aria-label": "Your audio" }));
      }
    }
    return b;
  }

  // One streamed assistant reply.
  class Turn {
    constructor(kind) {
      this.kind = kind;
      this.b = addBubble("assistant");
      this.b.node.dataset.state = "streaming";
      this.b.node.setAttribute("aria-busy", "true");
      this.text = "";
      this.transcript = "";
      this.images = [];
      this.pcm = [];
      this.audioWav = null;
      this.audioId = null;
      this.chunks = 0;
      this.player = null;
      this.finish = null;
      this.typing = el("span", { class: "typing", "aria-label": "omnitok is replying" }, el("i"), el("i"), el("i"));
      this.b.bubble.append(this.typing);
      this.controller = new AbortController();
    }
    renderText() {
      // spoken replies may carry their words only as the audio transcript
      this.b.textEl.textContent = this.text || this.transcript;
      scrollDown();
    }
    addText(t) { if (t) { this.text += t; this.renderText(); } }
    addTranscript(t) { if (t) { this.transcript += t; this.renderText(); } }
    addImage(url) {
      if (typeof url !== "string" || !/^(data:image\/|https?:|\/)/.test(url)) return;
      this.images.push(url);
      this.b.bubble.insertBefore(shownImage(url, `Generated picture ${this.images.length}`), this.typing);
      this.b.node.dataset.images = String(this.images.length);
      scrollDown();
    }
    addPart(p) {
      if (!p || typeof p !== "object") return;
      if (p.type === "text" || p.type === "output_text") this.addText(p.text || "");
      else if (p.type === "image_url" || p.image_url) this.addImage(p.image_url && (p.image_url.url || p.image_url));
      else if (p.type === "image" && (p.url || p.data)) this.addImage(p.url || `data:image/png;base64,${p.data}`);
    }
    addContent(content) {
      if (typeof content === "string") this.addText(content);
      else if (Array.isArray(content)) content.forEach((p) => this.addPart(p));
    }
    addAudioDelta(a) {
      if (!a || typeof a !== "object") return;
      if (a.id) this.audioId = a.id;
      if (a.transcript) this.addTranscript(a.transcript);
      if (a.data) {
        const bytes = base64ToBytes(a.data);
        this.pcm.push(bytes);
        if (!this.player) {
          this.player = new PcmPlayer(playContext());
          this.speaking = el("span", { class: "speaking", text: "♪ speaking…" });
          this.b.bubble.insertBefore(this.speaking, this.typing);
        }
        this.player.push(bytes);
        this.chunks += 1;
        this.b.node.dataset.chunks = String(this.chunks);
      }
    }
    applyChunk(chunk) {
      if (chunk.error) throw new ApiError(chunk.error.message || JSON.stringify(chunk.error));
      for (const choice of chunk.choices || []) {
        const d = choice.delta || choice.message || {};
        this.addContent(d.content);
        if (Array.isArray(d.images)) d.images.forEach((p) => this.addPart(p));
        this.addAudioDelta(d.audio);
        if (choice.finish_reason) this.finish = choice.finish_reason;
      }
    }
    // a non-streamed chat.completion (a server may answer with one even when asked to stream)
    applyCompletion(data) {
      const msg = (data.choices && data.choices[0] && data.choices[0].message) || {};
      this.addContent(msg.content);
      if (Array.isArray(msg.images)) msg.images.forEach((p) => this.addPart(p));
      if (msg.audio) {
        if (msg.audio.transcript) this.addTranscript(msg.audio.transcript);
        if (msg.audio.data) {
          const bytes = base64ToBytes(msg.audio.data);
          const isWav = bytes.length > 12 && String.fromCharCode(...bytes.subarray(0, 4)) === "RIFF";
          this.audioWav = isWav ? bytes : wavFromPcm16Bytes(bytes);
        }
      }
      this.finish = data.choices && data.choices[0] && data.choices[0].finish_reason;
    }
    done(stateName, note) {
      this.typing.remove();
      if (this.speaking) this.speaking.remove();
      const wav = this.audioWav || (this.pcm.length ? wavFromPcm16Bytes(concat(this.pcm)) : null);
      if (wav) {
        const url = URL.createObjectURL(new Blob([wav], { type: "audio/wav" }));
        this.b.bubble.append(el("audio", { src: url, controls: true, preload: "metadata", "aria-label": "Spoken reply" }));
        this.b.bubble.append(el("a", { class: "note", href: url, download: "omnitok-reply.wav", text: "download WAV" }));
      }
      if (!this.text && !this.transcript && !this.images.length && !wav && stateName === "done") {
        note = note || "(empty reply)";
      }
      if (this.finish === "length" && stateName === "done") note = note || "(stopped at the token limit)";
      if (note) this.b.bubble.append(el("span", { class: "note", text: note }));
      this.b.node.dataset.state = stateName;
      this.b.node.removeAttribute("aria-busy");
      scrollDown();
    }
    fail(message) {
      this.typing.remove();
      if (this.speaking) this.speaking.remove();
      if (this.player) this.player.stop();
      this.b.node.classList.add("error");
      this.b.node.dataset.state = "error";
      this.b.node.removeAttribute("aria-busy");
      this.b.node.setAttribute("aria-label", "Error");
      this.b.bubble.append(el("div", { class: "error-text", role: "alert", text: `Error: ${message}` }));
      scrollDown(true);
      return this.b;
    }
    // what goes back into the history
    message() {
      const text = this.text || this.transcript;
      if (!this.images.length) return { role: "assistant", content: text };
      const parts = [];
      if (text) parts.push({ type: "text", text });
      for (const url of this.images) parts.push({ type: "image_url", image_url: { url } });
      return { role: "assistant", content: parts };
    }
    get hasOutput() { return Boolean(this.text || this.transcript || this.images.length || this.pcm.length); }
  }

  class ApiError extends Error {}

  function concat(arrays) {
    const out = new Uint8Array(arrays.reduce((n, a) => n + a.length, 0));
    let at = 0;
    for (const a of arrays) { out.set(a, at); at += a.length; }
    return out;
  }

  // Server-sent events: "data: ..." lines, an empty line ends an event.
  async function readEvents(resp, onData) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    const flush = () => {
      if (!data.length) return false;
      const payload = data.join("\n");
      data = [];
      return onData(payload);
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buffer.search(/\r?\n|\r/)) >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + (buffer[nl] === "\r" && buffer[nl + 1] === "\n" ? 2 : 1));
          if (line === "") { if (flush()) { reader.cancel().catch(() => {}); return; } }
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
          // "event:", "id:", "retry:" and ":" comments are not needed here
        }
        if (done) { if (buffer.startsWith("data:")) data.push(buffer.slice(5).replace(/^ /, "")); flush(); return; }
      }
    } catch (err) {
      reader.cancel().catch(() => {});
      throw err;
    }
  }

  // ---------------------------------------------------------------- sending

  function requestBody(kind) {
    const body = { model: state.model || "omnitok", messages: state.history, stream: true };
    if (kind === "voice") {
      body.modalities = ["text", "audio"];
      body.audio = { voice: els.voice.value || "alloy", format: "pcm16" };
      if (els.pitch.value) body.audio.pitch = els.pitch.value;
      if (els.rate.value) body.audio.rate = els.rate.value;
    } else if (kind === "image") {
      body.modalities = ["image"];
    } else {
      body.modalities = ["text"];
    }
    const maxTokens = parseInt(localStorage.getItem(STORE.maxTokens) || "", 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    const temperature = parseFloat(localStorage.getItem(STORE.temperature) || "");
    if (!Number.isNaN(temperature)) body.temperature = temperature;
    const seed = parseInt(localStorage.getItem(STORE.seed) || "", 10);
    if (!Number.isNaN(seed)) body.seed = seed;
    return body;
  }

  function userContent(text, attachments) {
    if (!attachments.length) return text;
    const parts = [];
    if (text) parts.push({ type: "text", text });
    for (const a of attachments) {
      if (a.kind === "image") parts.push({ type: "image_url", image_url: { url: a.url } });
      else parts.push({ type: "input_audio", input_audio: { data: bytesToBase64(a.wav), format: "wav" } });
    }
    return parts;
  }

  function setBusy(busy) {
    els.sendBtn.hidden = busy;
    els.stopBtn.hidden = !busy;
    els.sendBtn.disabled = busy;
    els.composer.setAttribute("aria-busy", String(busy));
  }

  async function send() {
    if (state.turn) return;
    if (state.recorder) await stopRecording();
    const text = els.message.value.trim();
    const attachments = state.attachments.slice();
    if (!text && !attachments.length) { els.message.focus(); return; }
    const message = { role: "user", content: userContent(text, attachments) };
    // only the latest failed message can be sent again (the conversation stays in order)
    for (const old of els.log.querySelectorAll(".msg .actions")) old.remove();
    els.message.value = "";
    autosize();
    state.attachments = [];
    renderAttachments();
    setStatus("");
    const userBubble = renderUser(message.content);
    await runTurn(message, userBubble);
  }

  async function runTurn(message, userBubble) {
    const kind = els.replyKind.value;
    if (kind === "voice") playContext(); // created inside the click, so the browser lets it play
    state.history.push(message);
    const turn = new Turn(kind);
    state.turn = turn;
    setBusy(true);
    let failure = null;
    try {
      if (!state.model) await (state.loading || loadInfo()); // e.g. the key was only just entered
      const resp = await fetch(`${BASE}v1/chat/completions`, {
        method: "POST", headers: headers(true), body: JSON.stringify(requestBody(kind)), signal: turn.controller.signal,
      });
      if (!resp.ok) throw new ApiError(await errorText(resp));
      const type = resp.headers.get("content-type") || "";
      if (type.includes("text/event-stream")) {
        await readEvents(resp, (payload) => {
          if (payload.trim() === "[DONE]") return true;
          let chunk;
          try { chunk = JSON.parse(payload); } catch { throw new ApiError(`unreadable event from the server: ${payload.slice(0, 200)}`); }
          turn.applyChunk(chunk);
          return false;
        });
      } else {
        const data = await resp.json();
        if (data.error) throw new ApiError(data.error.message || JSON.stringify(data.error));
        turn.applyCompletion(data);
      }
      turn.done("done");
    } catch (err) {
      if (err && err.name === "AbortError") {
        if (turn.player) turn.player.stop();
        turn.done("stopped", "(stopped)");
      } else {
        const why = err instanceof ApiError ? err.message : `could not reach the server (${err && err.message ? err.message : err})`;
        failure = why;
      }
    } finally {
      state.turn = null;
      setBusy(false);
    }
    if (failure !== null) {
      // the failed exchange leaves the history; the user bubble offers to send it again
      if (state.history[state.history.length - 1] === message) state.history.pop();
      turn.fail(failure);
      offerRetry(message, userBubble, turn, "not answered — left out of the conversation");
      if (/401|403|api key|unauthori[sz]ed/i.test(failure)) openSettings(true);
    } else if (turn.hasOutput) {
      state.history.push(turn.message());
    } else if (state.history[state.history.length - 1] === message) {
      // stopped before anything came back: the question leaves the history too, and can be sent again
      state.history.pop();
      offerRetry(message, userBubble, turn, "no reply — left out of the conversation");
    }
    els.message.focus();
  }

  function offerRetry(message, userBubble, turn, why) {
    userBubble.node.classList.add("unsent");
    for (const old of userBubble.bubble.querySelectorAll(".note")) old.remove();
    const note = el("span", { class: "note", text: why });
    const retry = el("button", {
      type: "button", class: "link", text: "Try again",
      onclick: () => {
        if (state.turn) return;
        actions.remove();
        note.remove();
        userBubble.node.classList.remove("unsent");
        turn.b.node.remove();
        runTurn(message, userBubble);
      },
    });
    const actions = el("div", { class: "actions" }, retry);
    turn.b.bubble.append(actions);
    userBubble.bubble.append(note);
  }

  function stop() {
    if (state.turn) state.turn.controller.abort();
  }

  function clearConversation() {
    stop();
    state.history = [];
    for (const n of els.log.querySelectorAll(".msg")) n.remove();
    els.empty.hidden = false;
    setStatus("");
    els.message.focus();
  }

  function updateKindControls() {
    const voice = els.replyKind.value === "voice";
    els.voice.disabled = !voice;
    els.pitch.disabled = !voice;
    els.rate.disabled = !voice;
    els.voiceField.classList.toggle("off", !voice);
  }

  function autosize() {
    els.message.style.height = "auto";
    els.message.style.height = `${Math.min(els.message.scrollHeight + 2, 180)}px`;
  }

  // ---------------------------------------------------------------- wiring

  els.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  els.message.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  els.message.addEventListener("input", autosize);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.turn) stop(); });
  els.stopBtn.addEventListener("click", stop);
  els.imageInput.addEventListener("change", onImageChosen);
  els.audioInput.addEventListener("change", onAudioChosen);
  els.recordBtn.addEventListener("click", () => (state.recorder ? stopRecording() : startRecording()));
  els.replyKind.addEventListener("change", updateKindControls);
  els.clearBtn.addEventListener("click", clearConversation);
  els.settingsBtn.addEventListener("click", () => openSettings(els.settings.hidden));
  els.settingsForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const key = els.apiKey.value.trim();
    if (key) localStorage.setItem(STORE.key, key); else localStorage.removeItem(STORE.key);
    for (const [name, input] of [["maxTokens", els.maxTokens], ["temperature", els.temperature], ["seed", els.seed]]) {
      if (input.value.trim()) localStorage.setItem(STORE[name], input.value.trim());
      else localStorage.removeItem(STORE[name]);
    }
    openSettings(false);
    setStatus("Settings saved.");
    loadInfo();
  });
  els.forgetKey.addEventListener("click", () => {
    localStorage.removeItem(STORE.key);
    els.apiKey.value = "";
    setStatus("API key forgotten.");
  });

  els.apiKey.value = apiKey();
  els.maxTokens.value = localStorage.getItem(STORE.maxTokens) || "";
  els.temperature.value = localStorage.getItem(STORE.temperature) || "";
  els.seed.value = localStorage.getItem(STORE.seed) || "";
  updateKindControls();
  loadInfo();
  els.message.focus();
})();
