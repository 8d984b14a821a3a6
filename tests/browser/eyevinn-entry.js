// Bundle entry for Eyevinn's WHEP player (npm @eyevinn/webrtc-player, CommonJS):
// run.mjs builds it with esbuild into build/eyevinn.js for eyevinn.html.
import { WebRTCPlayer } from "@eyevinn/webrtc-player";

window.WebRTCPlayer = WebRTCPlayer;
