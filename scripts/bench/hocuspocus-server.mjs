// Benchmark peer (outside Chorus's data flow): a stock Hocuspocus server, in memory, no
// extensions — what `@hocuspocus/server`'s README starts. scripts/bench.sh copies this file
// next to the npm-installed package and runs it with `node`.
import { Server } from '@hocuspocus/server'

const port = Number(process.env.PORT || 1235)
const server = new Server({ port, address: '127.0.0.1', quiet: true })
await server.listen()
console.log(`hocuspocus listening on 127.0.0.1:${port}`)
