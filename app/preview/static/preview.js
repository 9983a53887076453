// Polls /stats twice a second and drives the record button (POST /record, JSON).
"use strict";

const $ = (id) => document.getElementById(id);
let recording = false;

function number(value, digits, unit) {
  return value === null || value === undefined ? "–" : value.toFixed(digits) + (unit || "");
}

function showClasses(classes) {
  const body = $("classes").tBodies[0];
  body.replaceChildren(...classes.map((entry) => {
    const row = document.createElement("tr");
    const name = document.createElement("td");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = entry.color ? `rgb(${entry.color.join(",")})` : "transparent";
    name.append(swatch, entry.name);
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${(100 * entry.fraction).toFixed(1)}%`;
    name.append(bar);
    const fraction = document.createElement("td");
    fraction.className = "fraction";
    fraction.textContent = `${(100 * entry.fraction).toFixed(1)} %`;
    row.append(name, fraction);
    return row;
  }));
}

function showRecording(state) {
  recording = state.active;
  const button = $("record");
  button.classList.toggle("active", recording);
  button.textContent = recording ? "■ Stop recording" : "● Start recording";
  const note = $("recording");
  note.classList.toggle("error", Boolean(state.error));
  const name = (path) => path.split("/").pop();
  note.title = state.file || state.last_saved || "";
  if (state.error) note.textContent = state.error;
  else if (recording) note.textContent = `${name(state.file)}: ${state.frames} frames`;
  else if (state.last_saved) note.textContent = `saved ${name(state.last_saved)}`;
  else note.textContent = "";
}

function show(stats) {
  $("fps").textContent = number(stats.fps, 1);
  $("latency").textContent = number(stats.latency_ms, 0, " ms");
  $("dropped").textContent = stats.frames_dropped;
  $("frames").textContent = stats.frames;
  $("viewers").textContent = stats.viewers;
  $("source").textContent = stats.source ? `${stats.source}  ${stats.size[0]}×${stats.size[1]}` : "";
  showClasses(stats.classes || []);
  showRecording(stats.recording);
  const state = $("state");
  state.textContent = stats.ended ? "ended" : stats.frames ? "live" : "waiting for frames";
  state.className = "state " + (stats.ended ? "ended" : stats.frames ? "live" : "");
  $("record").disabled = Boolean(stats.ended);
}

async function poll() {
  try {
    const response = await fetch("/stats", { cache: "no-store" });
    show(await response.json());
  } catch (error) {
    $("state").textContent = "run ended";
    $("state").className = "state ended";
    $("record").disabled = true;
    return;
  }
  setTimeout(poll, 500);
}

$("record").addEventListener("click", async () => {
  $("record").disabled = true;
  try {
    const response = await fetch("/record", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ recording: !recording }),
    });
    const state = await response.json();
    if (response.ok) showRecording(state);
    else showRecording({ active: recording, error: state.error });
  } finally {
    $("record").disabled = false;
  }
});

poll();
