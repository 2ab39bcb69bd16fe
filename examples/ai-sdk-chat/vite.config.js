import { defineConfig } from "vite";
import react from "@vitejs/plugin-react";

// `npm run dev` and `npm run preview` forward /v1 to Baton, so the app and
// the API share one origin (no CORS). BATON_URL picks the server.
const baton = process.env.BATON_URL ?? "http://127.0.0.1:7700";
const proxy = { "/v1": { target: baton, changeOrigin: true } };

export default defineConfig({
  plugins: [react()],
  server: { proxy },
  preview: { proxy },
});
