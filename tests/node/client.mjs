// One call through the official OpenAI Node SDK, for tests/test_sdks.py: the call is described by the JSON in
// argv[2] ({baseURL, apiKey, timeout?, requestTimeout?, maxRetries?, defaultHeaders?, stream?, model?}); one JSON
// line on stdout says what the SDK returned or raised, and how long it took. `timeout` is the client's,
// `requestTimeout` the call's own (both in milliseconds): since SDK 5.x only the call's own is sent upstream as
// X-Stainless-Timeout.
import OpenAI from "openai";

const call = JSON.parse(process.argv[2]);
const options = { baseURL: call.baseURL, apiKey: call.apiKey };
if (call.timeout !== undefined) options.timeout = call.timeout; // milliseconds; else the SDK's default
if (call.maxRetries !== undefined) options.maxRetries = call.maxRetries; // else the SDK's default (2)
if (call.defaultHeaders !== undefined) options.defaultHeaders = call.defaultHeaders;
const client = new OpenAI(options);
const started = performance.now();
const flexHeaders = (headers) =>
  Object.fromEntries([...headers.entries()].filter(([name]) => name.startsWith("x-flex-")));

try {
  const request = {
    model: call.model ?? "o3",
    messages: [{ role: "user", content: "hi" }],
    stream: Boolean(call.stream),
  };
  const perCall = call.requestTimeout !== undefined ? { timeout: call.requestTimeout } : undefined;
  const { data, response } = await client.chat.completions.create(request, perCall).withResponse();
  const result = { ok: true, status: response.status, headers: flexHeaders(response.headers) };
  if (call.stream) {
    result.chunks = [];
    for await (const chunk of data) result.chunks.push(chunk);
  } else {
    result.body = data;
  }
  result.elapsed_ms = performance.now() - started;
  console.log(JSON.stringify(result));
} catch (error) {
  console.log(JSON.stringify({
    ok: false,
    name: error?.constructor?.name,
    status: error?.status ?? null,
    code: error?.code ?? null,
    type: error?.type ?? null,
    headers: error?.headers ? Object.fromEntries(error.headers.entries()) : null,
    elapsed_ms: performance.now() - started,
  }));
}
