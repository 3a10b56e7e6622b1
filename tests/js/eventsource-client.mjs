// The npm `eventsource` package (a WHATWG EventSource for Node.js), driven by
// tests/integration/test_client_recovery.py.
//
//   node eventsource-client.mjs <url> <event types, comma-separated> [seconds]
//
// Prints one JSON object per line on stdout: {"kind":"open"}, {"kind":"event",...} for each
// event of the listed types, {"kind":"error",...} (with the readyState right after it: 0 while
// the EventSource reconnects by itself, 2 once it gave up). Exits on SIGTERM/SIGINT or after
// `seconds` (default 60).
import {EventSource} from 'eventsource'

const [url, types = '', seconds = '60'] = process.argv.slice(2)
const out = (record) => process.stdout.write(JSON.stringify(record) + '\n')

const source = new EventSource(url)
source.addEventListener('open', () => out({kind: 'open', readyState: source.readyState}))
source.addEventListener('error', (event) =>
  out({
    kind: 'error',
    readyState: source.readyState,
    code: event.code ?? null,
    message: event.message ?? null,
  }),
)
for (const type of types.split(',').filter(Boolean)) {
  source.addEventListener(type, (event) =>
    out({kind: 'event', type: event.type, data: event.data, id: event.lastEventId}),
  )
}

const stop = () => {
  source.close()
  out({kind: 'stopped'})
  process.exit(0)
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
setTimeout(stop, Number(seconds) * 1000)
