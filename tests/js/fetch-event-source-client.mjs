// @microsoft/fetch-event-source on Node.js (global fetch), driven by
// tests/integration/test_client_recovery.py.
//
//   node fetch-event-source-client.mjs <url> [seconds]
//
// Reads one stream, without reconnecting, and prints one JSON object per line on stdout:
// {"kind":"open",...}, {"kind":"message",...} for every message the library hands to
// `onmessage` (an empty one included: that is what the test looks for), then
// {"kind":"closed"} when the server ends the stream, or {"kind":"error",...}. Exits then, on
// SIGTERM/SIGINT, or after `seconds` (default 60).
import {createRequire} from 'node:module'

// The library is written for browsers: it takes fetch and its timers from `window` and
// listens to `document` visibility changes (even with openWhenHidden it removes its listener
// when done). A minimal shim is all it needs on Node.js. Its ES module build imports
// './parse' without an extension, which Node.js refuses, so the CommonJS build is loaded.
globalThis.window ??= globalThis
globalThis.document ??= {
  hidden: false,
  addEventListener() {},
  removeEventListener() {},
}
const require = createRequire(import.meta.url)
const {fetchEventSource} = require('@microsoft/fetch-event-source')

const [url, seconds = '60'] = process.argv.slice(2)
const out = (record) => process.stdout.write(JSON.stringify(record) + '\n')
const controller = new AbortController()

const stop = (code = 0) => {
  controller.abort()
  process.exit(code)
}
process.on('SIGTERM', () => stop())
process.on('SIGINT', () => stop())
setTimeout(() => {
  out({kind: 'timeout'})
  stop()
}, Number(seconds) * 1000)

fetchEventSource(url, {
  signal: controller.signal,
  openWhenHidden: true,
  async onopen(response) {
    out({
      kind: 'open',
      status: response.status,
      contentType: response.headers.get('content-type'),
    })
    if (!response.ok) {
      throw new Error(`status ${response.status}`)
    }
  },
  onmessage(message) {
    out({
      kind: 'message',
      event: message.event,
      data: message.data,
      id: message.id,
      retry: message.retry ?? null,
    })
  },
  onclose() {
    out({kind: 'closed'})
  },
  onerror(error) {
    out({kind: 'error', message: String(error)})
    throw error // no retry: the test reads one stream
  },
}).then(
  () => stop(),
  () => stop(),
)
